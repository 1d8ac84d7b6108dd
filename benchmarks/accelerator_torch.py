"""The PyTorch reference of `benchmarks.accelerator`: transformers' Qwen2.5-VL (sdpa, bf16,
the same dimensions, its own random weights) on the same device, timed on the same
workloads. torch and transformers are imported on first use (the accelerator path imports
without them)."""

from __future__ import annotations

import time

import numpy as np

from recap_jax.tools import memory


def torch_model(config, device):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).to(torch.bfloat16)
    return model


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats, device) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_bytes(device):
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def reset_peak_memory(device) -> None:
    """Frees the cached blocks and restarts the peak count (between the train and generate rows)."""
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _tensor(x, device, dtype=None):
    import torch

    return torch.tensor(np.asarray(x), device=device, dtype=dtype)


def train_row(model, config, workload: memory.Workload, device: str, repeats: int) -> dict:
    """A TRL-style GRPO step: forward + backward + AdamW with gradient checkpointing (as TRL and
    EasyR1 train), each prompt repeated for its G completions, logits at the completion
    positions only; the batch is `memory.example_batch`'s, as the JAX step's."""
    import torch

    batch = memory.example_batch(config, workload)
    prompt = batch["prompt"]
    ids = np.concatenate([np.repeat(prompt.input_ids, workload.group_size, 0), batch["completions"]], 1)
    pixels = np.repeat(prompt.pixel_values.reshape(workload.batch, -1, prompt.pixel_values.shape[-1]),
                       workload.group_size, 0).reshape(-1, prompt.pixel_values.shape[-1])
    grid = np.repeat(np.asarray([workload.grid(config)] * workload.batch), workload.group_size, 0)
    ids_t = _tensor(ids.astype(np.int64), device)
    kwargs = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                  pixel_values=_tensor(pixels, device, torch.bfloat16),
                  image_grid_thw=_tensor(grid.astype(np.int64), device),
                  mm_token_type_ids=_tensor((ids == config.image_token_id).astype(np.int64), device))
    completion = workload.completion_len
    adv = _tensor(batch["rewards"][:, 0] - batch["rewards"].mean(), device, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    model.gradient_checkpointing_enable()

    def step():
        logits = model(**kwargs, logits_to_keep=completion + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids_t[:, -completion:, None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        loss = -torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_time(step, repeats, device)
    return {"step_s": seconds, "peak_bytes": peak_bytes(device), "gradient_checkpointing": True,
            "what": "TRL-style: prompt repeated per completion, logits at the completion positions"}


def generate_row(model, config, prompt, device: str, image_size: int, samples: int, new_tokens: int,
                 repeats: int) -> dict:
    """``generate`` with ``num_return_sequences=samples`` and exactly ``new_tokens`` new tokens
    (no EOS) after the prompts of ``prompt`` (a `ModelInputs`, one square image each); the
    decode step's time is (generate - prefill) / new_tokens, as the JAX row's."""
    import torch

    prompts, prompt_len = prompt.input_ids.shape
    side = image_size // config.vision.patch_size
    kwargs = dict(input_ids=_tensor(prompt.input_ids.astype(np.int64), device),
                  attention_mask=_tensor(prompt.attention_mask.astype(np.int64), device),
                  pixel_values=_tensor(prompt.pixel_values, device, torch.bfloat16),
                  image_grid_thw=_tensor(np.asarray([[1, side, side]] * prompts, np.int64), device),
                  mm_token_type_ids=_tensor((prompt.input_ids == config.image_token_id).astype(np.int64), device))
    model.eval()
    model.generation_config.eos_token_id = None

    def prefill():
        with torch.no_grad():
            model(**kwargs, logits_to_keep=1)

    def generate():
        with torch.no_grad():
            model.generate(**kwargs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           num_return_sequences=samples, pad_token_id=config.pad_token_id)

    prefill_s = median_time(prefill, repeats, device)
    total_s = median_time(generate, max(1, repeats - 1), device)
    step_s = max(total_s - prefill_s, 1e-9) / new_tokens
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": prompts * prompt_len / prefill_s,
            "generate_s": total_s, "step_s": step_s, "tokens_per_s": prompts * samples / step_s,
            "peak_bytes": peak_bytes(device)}
