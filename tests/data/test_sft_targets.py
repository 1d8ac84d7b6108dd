"""The released OCR replay's conversation loss: `sft_targets.conversation_batch` against a
transcription of the released SFT labels (chat template with the assistant turn and a
generation prompt, every non-pad, non-image token a label), and the cut prompt + completion
scored by the trainer equal to a forward over the whole conversation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recap_jax import sampling
from recap_jax.data import encode, sft_targets, synthetic, tasks
from recap_jax.data.records import Record
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl import processor as processor_lib

VOCAB = 400
TASK = tasks.get_task("ocr_llava_released")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    corpus = [TASK.format_prompt(r.question) + " " + TASK.format_target(r.answer_text)
              for r in synthetic.generate("ocr", "train", 40)]
    tokenizer = processor_lib.build_demo_tokenizer(corpus * 3, VOCAB, tmp_path_factory.mktemp("tok"))
    return processor_lib.Qwen2_5_VLProcessor(tokenizer)


@pytest.fixture(scope="module")
def model_config():
    return config_lib.tiny(VOCAB)


def records():
    rng = np.random.default_rng(0)
    out = []
    for k, (h, w, text) in enumerate([(56, 84, "ab 12"), (112, 56, "HELLO world 7")]):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        out.append(Record(id=f"r{k}", source=TASK.name, image=image, question="Read the text.",
                          answer=TASK.format_target(text)))  # the replay target (<answer> tags)
    return out


def collated(processor, model_config):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=512, max_answer_tokens=64)
    examples = [encoder.encode(TASK, r) for r in records()]
    padded = {}
    for key in ("input_ids", "answer_ids"):
        width = max(len(e[key]) for e in examples)
        padded[key] = np.stack([np.pad(e[key], (0, width - len(e[key]))) for e in examples])
    width = max(e["position_ids"].shape[1] for e in examples)
    padded["position_ids"] = np.stack([np.pad(e["position_ids"], ((0, 0), (0, width - e["position_ids"].shape[1])))
                                       for e in examples])
    patches = max(len(e["pixel_values"]) for e in examples)
    padded["pixel_values"] = np.stack([np.pad(e["pixel_values"], ((0, patches - len(e["pixel_values"])), (0, 0)))
                                       for e in examples])
    for key in ("rope_delta", "image_grid_thw", "image_size", "input_size"):
        padded[key] = np.stack([e[key] for e in examples])
    padded["prompt_length"] = np.array([len(e["input_ids"]) for e in examples], np.int32)
    padded["answer_length"] = np.array([len(e["answer_ids"]) for e in examples], np.int32)
    padded["num_patches"] = np.array([len(e["pixel_values"]) for e in examples], np.int32)
    return encode.collate(padded, pad_id=encoder.pad_id, prompt_buckets=(256, 512),
                          answer_buckets=(32, 64), patch_buckets=(64, 256)), encoder


def released_labels(processor, record):
    """Transcription of the released `_prepare_inputs_sft`: the whole conversation rendered
    with add_generation_prompt=True, labels = ids except padding and image pads (-100), and
    the label of position j predicted at j - 1 (HF's shift)."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TASK.format_prompt(
            record.question)}]},
        {"role": "assistant", "content": [{"type": "text", "text": record.answer}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = np.asarray(processor(text=[text], images=[[record.image]])["input_ids"][0])
    pad = processor_lib.special_token_ids(processor.tokenizer)["pad_token_id"]
    labels = np.where((ids == pad) | (ids == processor.image_token_id), -100, ids)
    trained = {j for j in range(1, len(ids)) if labels[j] != -100}
    return ids, trained


def test_conversation_batch_trains_the_released_labels_after_the_image(processor, model_config):
    batch, encoder = collated(processor, model_config)
    tail = sft_targets.released_tail_ids(processor.tokenizer)
    out = sft_targets.conversation_batch(batch, image_token_id=processor.image_token_id, pad_id=encoder.pad_id,
                                         completion_buckets=(32, 64, 128), tail_ids=tail)
    assert "position_ids" not in out and out["pixel_values"] is batch["pixel_values"]
    for row, record in enumerate(records()):
        ids, trained = released_labels(processor, record)
        prompt = out["input_ids"][row][out["attention_mask"][row].astype(bool)]
        completion = out["answer_ids"][row][out["answer_mask"][row].astype(bool)]
        # the same token sequence as the released conversation, cut after the last image pad
        np.testing.assert_array_equal(np.concatenate([prompt, completion]), ids)
        assert prompt[-1] == processor.image_token_id
        ours = set(range(len(prompt), len(ids)))
        assert ours <= trained  # everything we train, the released loss trains
        missing = trained - ours  # ... and it also trains the template tokens before the image
        assert missing == {j for j in range(1, len(prompt)) if ids[j] != processor.image_token_id}
        assert len(missing) == sft_targets.untrained_prefix(prompt, processor.image_token_id)
        before_image = ids[:np.flatnonzero(ids == processor.image_token_id)[0]]
        assert processor.tokenizer.decode(before_image.tolist()).endswith("user\n<|vision_start|>")
    # the answer-only loss of `ocr_llava` would train only the answer: far fewer tokens
    assert out["answer_mask"].sum() > 2 * batch["answer_mask"].sum()


def test_cut_prompt_scores_like_the_whole_conversation(processor, model_config):
    """Positions: the completion after a prompt that ends in image pads sits where it sits in
    the full sequence (M-RoPE continues after the image), so the trainer's log-probs of the
    cut batch equal a forward over the whole conversation."""
    batch, encoder = collated(processor, model_config)
    out = sft_targets.conversation_batch(batch, image_token_id=processor.image_token_id, pad_id=encoder.pad_id,
                                         completion_buckets=(64,))
    model = model_lib.Qwen2_5_VLForConditionalGeneration(model_config, rngs=nnx.Rngs(0))
    pixels, grid = encode.flat_vision_inputs(out)
    inputs = jax.tree.map(jnp.asarray, sampling.prepare_prompts(
        model, out["input_ids"], out["attention_mask"], pixels, grid, pad_token_id=encoder.pad_id))
    got = np.asarray(sampling.completion_logprobs(model, inputs, jnp.asarray(out["answer_ids"]),
                                                  jnp.asarray(out["answer_mask"])))
    for row in range(len(records())):
        prompt = out["input_ids"][row][out["attention_mask"][row].astype(bool)]
        completion = out["answer_ids"][row][out["answer_mask"][row].astype(bool)]
        full = np.concatenate([prompt, completion])[None]
        row_pixels = encode.flat_vision_inputs({k: out[k][row:row + 1] for k in
                                                ("pixel_values", "num_patches", "image_grid_thw")})
        logits = model(jnp.asarray(full), jnp.ones_like(jnp.asarray(full)), jnp.asarray(row_pixels[0]),
                       jnp.asarray(row_pixels[1]))
        logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1].astype(jnp.float32), -1)
        expected = np.take_along_axis(np.asarray(logp), completion[:, None], -1)[:, 0]
        np.testing.assert_allclose(got[row, :len(completion)], expected, atol=2e-4)


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="batch row 1 has no image pad"):
        batch = {"input_ids": np.array([[5, 9, 6], [5, 6, 7]]), "attention_mask": np.ones((2, 3), int),
                 "answer_ids": np.array([[1], [1]]), "answer_mask": np.ones((2, 1), int)}
        sft_targets.conversation_batch(batch, image_token_id=9, pad_id=0, completion_buckets=(8,))
    with pytest.raises(ValueError, match="conversation completion length"):
        batch = {"input_ids": np.array([[5, 9, 6, 7, 8]]), "attention_mask": np.ones((1, 5), int),
                 "answer_ids": np.array([[1, 2]]), "answer_mask": np.ones((1, 2), int)}
        sft_targets.conversation_batch(batch, image_token_id=9, pad_id=0, completion_buckets=(3,))
