"""SFT targets of the released OCR replay: next-token loss over the whole conversation.

The released trainer renders the OCR conversation (user: image + question + "\\nOutput the
final answer in <answer> </answer> tags."; assistant: ``<answer>{answer}</answer>``) with
``apply_chat_template(..., add_generation_prompt=True)``, tokenises it with the image, and
trains cross-entropy on every token that is neither padding nor an image pad: the system
prompt, the user turn (question and instruction), the template tokens, the answer and the
trailing generation prompt ``\\n<|im_start|>assistant\\n`` that the template appends after
the assistant turn.

Our train step scores only completion tokens given a prompt (`sampling.completion_logprobs`
runs the prompt, vision tower included, once, and projects only the completion positions
onto the vocabulary), and the image must sit in the prompt. `conversation_batch` therefore
re-cuts each row of a collated replay batch (`encode.collate` layout) at the last image pad:

    prompt      = the chat prompt up to and including its last <|image_pad|>
    completion  = the rest of the prompt (<|vision_end|>, question, instruction, end of turn,
                  assistant header) + the answer tokens + <|im_end|> (+ ``tail_ids``)

and the completion mask is 1 on every completion token, so `rollout.sft_batch` unchanged
trains the whole conversation after the image. <|vision_end|> is predicted by the last image
pad, as in the released labels. What the released loss has and this has not: the tokens before
the image (``system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>``,
the first token excepted), the same few template tokens in every record (`untrained_prefix`
counts them). They are predicted almost perfectly by an instruct model and enter the
released token mean only through its denominator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from recap_jax.data.encode import bucket

__all__ = ["RELEASED_TAIL", "conversation_batch", "conversation_split", "released_tail_ids",
           "untrained_prefix"]

# What Qwen's chat template appends after the assistant turn when the released trainer asks
# for a generation prompt on a finished conversation (the "<|im_end|>" before it is ours).
RELEASED_TAIL = "\n<|im_start|>assistant\n"


def released_tail_ids(tokenizer) -> np.ndarray:
    """int32 token ids of `RELEASED_TAIL` (pass as ``tail_ids`` to match the released loss)."""
    return np.asarray(tokenizer(RELEASED_TAIL, add_special_tokens=False)["input_ids"], np.int32)


def conversation_split(prompt_ids: np.ndarray, answer_ids: np.ndarray, image_token_id: int,
                       tail_ids: Sequence[int] = (), *, where: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """(prompt up to its last image pad, completion = the rest + answer + tail), int32.

    prompt_ids: one chat prompt's real tokens (no padding); answer_ids: its answer tokens
    with the end-of-turn token. ValueError naming ``where`` if the prompt has no image pad.
    """
    prompt_ids = np.asarray(prompt_ids, np.int32)
    hits = np.flatnonzero(prompt_ids == image_token_id)
    if hits.size == 0:
        raise ValueError(f"conversation loss: {where} has no image pad token "
                         f"({image_token_id}) in its prompt; the split needs the image in the prompt")
    cut = int(hits[-1]) + 1
    completion = np.concatenate([prompt_ids[cut:], np.asarray(answer_ids, np.int32),
                                 np.asarray(tail_ids, np.int32)])
    return prompt_ids[:cut], completion


def untrained_prefix(prompt_ids: np.ndarray, image_token_id: int) -> int:
    """Tokens the released loss trains and `conversation_batch` does not: the non-image tokens
    before the last image pad, except the first token (which no position predicts)."""
    prompt_ids = np.asarray(prompt_ids)
    cut = int(np.flatnonzero(prompt_ids == image_token_id)[-1]) + 1
    return int(np.sum(prompt_ids[1:cut] != image_token_id))


def conversation_batch(batch: Mapping[str, np.ndarray], *, image_token_id: int, pad_id: int,
                       completion_buckets: Sequence[int], tail_ids: Sequence[int] = ()) -> dict:
    """A collated replay batch (`encode.collate`) re-cut for the conversation loss.

    Returns a new dict: ``input_ids`` / ``attention_mask`` [B, L] (same L, left-aligned) hold
    each prompt up to its last image pad; ``answer_ids`` / ``answer_mask`` [B, C] (C = the
    smallest of ``completion_buckets`` holding the longest completion) hold the rest of the
    conversation + answer + ``tail_ids``, mask 1 on all of it. The now stale ``position_ids``
    and ``rope_deltas`` are dropped (`rollout.prompt_inputs` recomputes positions from the
    ids). Every other field is passed through. Feed the result to `rollout.sft_batch`.
    """
    input_ids, attention_mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    answers, answer_mask = np.asarray(batch["answer_ids"]), np.asarray(batch["answer_mask"])
    rows, length = input_ids.shape
    prompts, completions = [], []
    for row in range(rows):
        real_prompt = input_ids[row][attention_mask[row].astype(bool)]
        real_answer = answers[row][answer_mask[row].astype(bool)]
        prompt, completion = conversation_split(real_prompt, real_answer, image_token_id, tail_ids,
                                                where=f"batch row {row}")
        prompts.append(prompt)
        completions.append(completion)
    size = bucket(max(len(c) for c in completions), completion_buckets,
                  "conversation completion length (rest of prompt + answer)")
    new_ids = np.full((rows, length), pad_id, np.int32)
    new_mask = np.zeros((rows, length), np.int32)
    new_answers = np.full((rows, size), pad_id, np.int32)
    new_answer_mask = np.zeros((rows, size), np.int32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        new_ids[row, length - len(prompt):] = prompt
        new_mask[row, length - len(prompt):] = 1
        new_answers[row, :len(completion)] = completion
        new_answer_mask[row, :len(completion)] = 1
    out = {key: value for key, value in batch.items() if key not in ("position_ids", "rope_deltas")}
    out.update(input_ids=new_ids, attention_mask=new_mask, answer_ids=new_answers,
               answer_mask=new_answer_mask)
    return out
