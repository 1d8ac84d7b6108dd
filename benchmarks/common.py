"""What the model benchmarks share: the random benchmark model, image prompts, timing, the
machine line, and a transformers checkpoint of the same weights for both sides."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers

from recap_jax.models.qwen2_5_vl import config as C


def bench_config() -> C.Qwen2_5_VLConfig:
    """Text 4 layers x hidden 512 (8 heads / 2 KV heads), vision depth 4 x 256, vocab 8192."""
    base = C.tiny(vocab_size=8192)
    text = dataclasses.replace(base.text, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12))
    vision = dataclasses.replace(base.vision, depth=4, hidden_size=256, intermediate_size=640, num_heads=4,
                                 out_hidden_size=512, window_size=112, fullatt_block_indexes=(3,))
    return dataclasses.replace(base, text=text, vision=vision)


def image_prompts(cfg: C.Qwen2_5_VLConfig, batch: int, text_tokens: int, image_side: int = 224, seed: int = 0):
    """``batch`` prompts of one image then ``text_tokens`` random text tokens (no padding).

    Returns input_ids, attention_mask, pixel_values [patches, C*T*P*P], image_grid_thw.
    """
    rng = np.random.default_rng(seed)
    side = image_side // cfg.vision.patch_size
    grid = np.array([[1, side, side]] * batch)
    row = ([cfg.vision_start_token_id] + [cfg.image_token_id] * (side * side // cfg.vision.merge_unit)
           + [cfg.vision_end_token_id])
    ids = np.stack([row + rng.integers(0, 8000, text_tokens).tolist() for _ in range(batch)])
    pixels = rng.normal(size=(int(grid.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, np.ones_like(ids), pixels, grid


def save_random_transformers_checkpoint(cfg: C.Qwen2_5_VLConfig, path: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())).save_pretrained(path)


def timed_rounds(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each runner over ``repeats`` rounds; in every round each runner is called
    twice in a row and the second call is timed (the first call of all also compiles).

    Rounds put both implementations under the same drift of a shared machine's load, and the
    best round is the least disturbed one (what ``timeit`` reports). The untimed call before
    each timed one matters: right after a PyTorch step our train step measured 4.6-7.0 s,
    right after one of ours 3.0-4.4 s (same process, 2-core host), so timing a call that
    follows the other library's would charge each side for the other's memory churn.
    """
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def cpu_line() -> str:
    """The host CPU's model name and widest vector ISA: ratios against PyTorch differ between
    an AVX-512 host and an AVX2 one of the same core count, so every table names it."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}"


def machine_line() -> str:
    return (f"machine: {platform.machine()} ({cpu_line()}), {os.cpu_count()} cores, jax {jax.__version__} on "
            f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def print_table(results: dict[str, float], ours: str, work: float, unit: str, time_label: str) -> None:
    """A markdown table: seconds, ``unit``/s (``work`` per call), and each row's time over ours."""
    print(f"| implementation | {time_label} | {unit}/s | recap_jax speed-up |")
    print("|---|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t:.4f} | {work / t:,.0f} | {t / results[ours]:.2f}x |")
