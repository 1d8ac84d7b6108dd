"""Evaluate a Qwen2.5-VL checkpoint on public benchmarks, scored by their published rules.

    python -m recap_jax.benchmarks_eval --model WORKDIR/final \\
        --suite mathvista=/data/MathVista --suite ai2d=/data/ai2d \\
        --suite "refcoco/testA=/data/rec_jsons_processed/refcoco_testA.json;image_root=/data/coco" \\
        --prompt thinking --out /tmp/bench [--batch-size 8] [--max-new-tokens 1024] \\
        [--temperature 0] [--limit 100] [--mesh fsdp=-1]

``--model``: any Hugging Face Qwen2.5-VL directory with its tokenizer (``WORKDIR/final``,
``WORKDIR/warmstart``, Qwen/Qwen2.5-VL-7B-Instruct). ``--suite LABEL=PATH[;split=..]
[;config=..][;image_root=..][;circular=..][;multi_image=..]``: a suite of
`recap_jax.bench.suites.SUITES` (a label may add "/variant", e.g. ``refcoco/testA``) and its
local copy. MMMU / MMMU-Pro questions with several images are shown all of them
(``multi_image=skip``: skipped and counted instead). ``--prompt``: the paper's non-thinking
("plain") or thinking prompt. Greedy by default (``--temperature 0``).

Writes ``OUT/<label>.json`` per suite (score, n, skipped rows and why, and per item the
question id, reference, completion, extracted answer and score) and ``OUT/summary.json`` /
``OUT/summary.md`` (the table also printed). A progress line with the rate and ETA goes to
stderr.

Batches are padded to ``--batch-size`` rows (the last row repeated; padding rows are not
scored), prompts to a length bucket and image patches to a geometric bucket, so each suite
compiles once per (prompt bucket, patch bucket). On a mesh the parameters are loaded onto
their shards and the prompt rows are split over the data axes, as in training.

`evaluate_suites` is the same evaluation for a training loop's (graphdef, params).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import types
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import numpy as np

from recap_jax import parallel, sampling
from recap_jax.bench import prompts as prompts_lib
from recap_jax.bench import scoring
from recap_jax.bench.suites import BenchItem, Suite, open_suite, parse_suite_spec
from recap_jax.data.records import BadRecord
from recap_jax.rollout import BATCH_AXES, Placement, decode_completions, gather

__all__ = ["Progress", "collate_prompts", "details_text", "encode_item", "evaluate_suite",
           "evaluate_suites", "format_progress", "main", "open_suites", "patch_bucket",
           "skipped_text", "suite_metrics", "summary_table", "write_results"]

MIN_PATCH_BUCKET = 256
PATCH_BUCKET_MULTIPLE = 64


# --------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def format_progress(label: str, done: int, total: int, elapsed: float) -> str:
    """One progress line: items done, rate and ETA (from the mean rate so far)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else math.inf
    width = 20
    filled = width * done // total if total else width
    bar = "#" * filled + "." * (width - filled)
    eta_text = _duration(eta) if math.isfinite(eta) else "?"
    return (f"{label} [{bar}] {done}/{total} items, {rate:.2f} items/s, elapsed "
            f"{_duration(elapsed)}, ETA {eta_text}")


class Progress:
    """A progress line rewritten in place on ``stream`` (off when stream is None)."""

    def __init__(self, label: str, total: int, stream: TextIO | None, clock=time.perf_counter):
        self.label, self.total, self.stream, self.clock = label, total, stream, clock
        self.start, self.done = clock(), 0

    def update(self, count: int) -> None:
        self.done += count
        if self.stream is not None:
            line = format_progress(self.label, self.done, self.total, self.clock() - self.start)
            self.stream.write("\r" + line)
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- encoding


def encode_item(processor, item: BenchItem, style: str, max_prompt_tokens: int) -> dict:
    """The prompt's token ids and image patches of one item; BadRecord if it cannot be used
    (image rejected by the preprocessor, prompt over ``max_prompt_tokens``).

    The user turn shows the item's images in order (one vision block each: MMMU's several),
    then the prompt text. pixel_values: all images' patches, in order; image_grids [I, 3]:
    each image's grid; image_grid_thw / image_size / input_size: the first image's (the one a
    grounding box refers to)."""
    images = list(item.images)
    messages = [{"role": "user", "content": [
        *({"type": "image"} for _ in images),
        {"type": "text", "text": prompts_lib.format_prompt(item.question, style)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    try:
        batch = processor(text=[text], images=[images])
    except (ValueError, TypeError) as error:
        raise BadRecord(f"image: cannot preprocess ({error})", "image") from None
    ids = np.asarray(batch["input_ids"][0], np.int32)
    if len(ids) > max_prompt_tokens:
        raise BadRecord(f"text: prompt has {len(ids)} tokens (max {max_prompt_tokens})", "text")
    grids = np.asarray(batch["image_grid_thw"], np.int64).reshape(-1, 3)
    if len(grids) != len(images):
        raise ValueError(f"{item.suite} {item.id}: {len(images)} images gave {len(grids)} grids")
    grid = grids[0]
    patch = processor.image_kwargs["patch_size"]
    return {"input_ids": ids, "pixel_values": np.asarray(batch["pixel_values"], np.float32),
            "image_grids": grids, "image_grid_thw": grid,
            "image_size": np.asarray(item.image_size, np.int32),
            "input_size": np.asarray([grid[1] * patch, grid[2] * patch], np.int32)}


def collate_prompts(examples: Sequence[dict], batch_size: int, pad_id: int) -> dict:
    """``batch_size`` rows (the last example repeated as padding), prompts left-aligned.

    pixel_values / image_grid_thw [num_images, 3]: every row's images concatenated in row
    order (a row's ``image_grids``, several for a multi-image question; or its one
    ``image_grid_thw``), the model's form; num_images [B]; image_size / input_size [B, 2]: each
    row's first image."""
    if not 0 < len(examples) <= batch_size:
        raise ValueError(f"need 1..{batch_size} examples, got {len(examples)}")
    rows = list(examples) + [examples[-1]] * (batch_size - len(examples))
    length = max(len(row["input_ids"]) for row in rows)
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, length - len(row["input_ids"]):] = row["input_ids"]
        mask[r, length - len(row["input_ids"]):] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": np.concatenate([row["pixel_values"] for row in rows]),
            "image_grid_thw": np.concatenate([_row_grids(row) for row in rows]),
            "num_images": np.asarray([len(_row_grids(row)) for row in rows], np.int32),
            "image_size": np.stack([row["image_size"] for row in rows]),
            "input_size": np.stack([row["input_size"] for row in rows])}


def _row_grids(row: dict) -> np.ndarray:
    """The [I, 3] grids of one encoded row's images."""
    grids = row["image_grids"] if "image_grids" in row else row["image_grid_thw"]
    return np.asarray(grids, np.int64).reshape(-1, 3)


def patch_bucket(total: int) -> int:
    """The padded patch count of a batch: 256, then steps of x1.5 rounded up to a multiple of
    64 (a few compiled shapes per suite, at most 1.5x padding)."""
    size = MIN_PATCH_BUCKET
    while size < total:
        size = -(-(size * 3 // 2) // PATCH_BUCKET_MULTIPLE) * PATCH_BUCKET_MULTIPLE
    return size


def _prompt_inputs(model_config, batch: dict, prompt_buckets: Sequence[int]):
    shim = types.SimpleNamespace(config=model_config)  # prepare_prompts reads model.config only
    return sampling.prepare_prompts(
        shim, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
        batch["image_grid_thw"], pad_token_id=model_config.pad_token_id,
        prompt_buckets=prompt_buckets, patch_bucket=patch_bucket(len(batch["pixel_values"])))


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class _Settings:
    style: str
    batch_size: int
    params: sampling.SamplingParams
    seed: int
    prompt_buckets: tuple[int, ...]


def _to_json(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _run_batch(graphdef, params, processor, model_config, examples, settings: _Settings,
               placement: Placement, batch_number: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(completion texts, lengths, truncated) of the real rows of one padded batch."""
    batch = collate_prompts([e for _, e in examples], settings.batch_size,
                            model_config.pad_token_id)
    inputs = _prompt_inputs(model_config, batch, settings.prompt_buckets)
    device_inputs = placement.to_device(placement.local_prompts(inputs), BATCH_AXES.prompt)
    rng = jax.random.fold_in(jax.random.key(settings.seed), batch_number)
    out = gather(sampling.generate_prepared(graphdef, params, device_inputs, settings.params, rng))
    texts = decode_completions(processor.tokenizer, np.asarray(out.tokens), np.asarray(out.lengths),
                               (model_config.eos_token_id, model_config.pad_token_id))
    count = len(examples)
    return texts[:count], np.asarray(out.lengths)[:count], np.asarray(out.truncated)[:count]


def _item_record(item: BenchItem, encoded: dict, text: str, length: int, truncated: bool,
                 rule: str) -> dict:
    value = scoring.score(rule, text, item, image_size=tuple(encoded["image_size"]),
                          input_size=tuple(encoded["input_size"]))
    return {"id": item.id, "reference": _to_json(item.answer), "answer": scoring.answer_text(text),
            "completion": text, "score": value, "length": int(length), "truncated": bool(truncated),
            "meta": {key: _to_json(v) for key, v in item.meta.items()}}


def suite_metrics(suite: Suite, items: Sequence[dict]) -> dict:
    """The suite's score and extra metrics from its scored item records: the suite's
    aggregate (MMBench: circular and vanilla accuracy; OCRBench v2: per type / category /
    language means), whose "score" is the suite score; else the mean item score."""
    metrics = suite.kind.aggregate(items) if suite.kind.aggregate and items else {}
    mean = float(np.mean([r["score"] for r in items])) if items else math.nan
    return {"score": float(metrics.pop("score", mean)), "item_mean": mean, "metrics": metrics}


def evaluate_suite(graphdef, params, processor, model_config, suite: Suite, settings: _Settings,
                   placement: Placement, progress_stream: TextIO | None = None) -> dict:
    """One suite's result: score (in [0, 1]: the mean item score, or the suite's published
    aggregate, see `suite_metrics`), item_mean, metrics, n, skipped and why, items."""
    items: list[dict] = []
    progress = Progress(suite.label, len(suite), progress_stream)
    pending: list[tuple[BenchItem, dict]] = []
    max_prompt = max(settings.prompt_buckets)
    batches = 0

    def flush():
        nonlocal batches
        texts, lengths, truncated = _run_batch(graphdef, params, processor, model_config,
                                               pending, settings, placement, batches)
        batches += 1
        for (item, encoded), text, length, cut in zip(pending, texts, lengths, truncated):
            items.append(_item_record(item, encoded, text, length, cut, suite.kind.rule))
        progress.update(len(pending))
        pending.clear()

    for index in range(len(suite)):
        item, encoded = suite.load_or_skip(index), None
        if item is not None:
            try:
                encoded = encode_item(processor, item, settings.style, max_prompt)
            except BadRecord as error:
                suite.skips.skip(suite.label, suite.path, index, error)
        if encoded is None:
            progress.update(1)
            continue
        pending.append((item, encoded))
        if len(pending) == settings.batch_size:
            flush()
    if pending:
        flush()
    return {"suite": suite.label, "path": suite.path, "rule": suite.kind.rule,
            "layout": suite.kind.layout, "prompt": settings.style,
            **suite_metrics(suite, items), "n": len(items),
            "skipped": suite.skips.count(suite.label), "skip_reasons": suite.skips.reasons(suite.label),
            "mean_length": float(np.mean([r["length"] for r in items])) if items else math.nan,
            "truncated": int(sum(r["truncated"] for r in items)), "items": items}


def evaluate_suites(graphdef, params, processor, model_config, suites: Sequence[Suite], *,
                    prompt: str = "plain", batch_size: int = 8, max_new_tokens: int = 1024,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, mesh=None,
                    prompt_buckets: Sequence[int] = sampling.DEFAULT_PROMPT_BUCKETS,
                    progress_stream: TextIO | None = None) -> dict[str, dict]:
    """{suite label: result} for a model split into (graphdef, params), e.g. a training
    loop's current policy. See `evaluate_suite` for a result's fields; ``mesh``: the mesh
    the params live on (prompt rows are split over its data axes)."""
    if prompt not in prompts_lib.PROMPTS:
        raise ValueError(f"prompt must be one of {sorted(prompts_lib.PROMPTS)}, got {prompt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params_ = sampling.SamplingParams(max_new_tokens, temperature=temperature, top_p=top_p,
                                      eos_token_id=model_config.eos_token_id,
                                      pad_token_id=model_config.pad_token_id).validate()
    settings = _Settings(prompt, batch_size, params_, seed, tuple(prompt_buckets))
    placement = Placement(mesh)
    results = {}
    for suite in suites:
        if mesh is None:
            results[suite.label] = evaluate_suite(graphdef, params, processor, model_config, suite,
                                                  settings, placement, progress_stream)
        else:
            with parallel.use_mesh(mesh):
                results[suite.label] = evaluate_suite(graphdef, params, processor, model_config,
                                                      suite, settings, placement, progress_stream)
    return results


def open_suites(specs: Sequence[str] | str, *, limit: int | None = None,
                cache_dir: str | None = None) -> list[Suite]:
    """Suites from ``LABEL=PATH[;key=value...]`` specs (`parse_suite_spec`) (a list, or one
    string of comma-separated specs, the form of a config field)."""
    if isinstance(specs, str):
        specs = [s for s in (part.strip() for part in specs.split(",")) if s]
    parsed = [parse_suite_spec(spec) for spec in specs]
    labels = [p["label"] for p in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"benchmark labels must be distinct, got {labels}")
    return [open_suite(p.pop("label"), p.pop("path"), limit=limit, cache_dir=cache_dir, **p)
            for p in parsed]


# --------------------------------------------------------------------------- output


def _percent(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "-"


def skipped_text(result: dict) -> str:
    """"N" or "N (reason n, ...)" of a result's skipped rows, e.g. "3 (multi_image 2, image 1)"."""
    reasons = result.get("skip_reasons") or {}
    if not reasons:
        return str(result["skipped"])
    parts = ", ".join(f"{kind} {count}" for kind, count in sorted(reasons.items(),
                                                                  key=lambda kv: (-kv[1], kv[0])))
    return f"{result['skipped']} ({parts})"


def details_text(result: dict) -> str:
    """The suite's extra metrics in a few words: MMBench's vanilla and circular accuracy,
    OCRBench v2's English / Chinese overall, its METEOR form and its unscored types; "" for
    other suites."""
    metrics = result.get("metrics") or {}
    parts = []
    if "circular" in metrics:
        parts.append(f"circular {_percent(metrics['circular'])}, vanilla "
                     f"{_percent(metrics['vanilla'])} ({metrics['questions']} questions)")
    for lang, value in (metrics.get("overall") or {}).items():
        parts.append(f"{lang} {_percent(value)}")
    if metrics.get("meteor"):
        parts.append(f"METEOR {metrics['meteor']}")
    if metrics.get("missing_types"):
        parts.append(f"partial: {len(metrics['missing_types'])} task types unscored")
    return "; ".join(parts)


def summary_table(results: dict[str, dict]) -> str:
    """A markdown table: suite, rule, n, score (%), skipped (with reasons), mean completion
    length, details (`details_text`)."""
    lines = ["| suite | rule | n | score (%) | skipped | mean length | details |",
             "|---|---|---:|---:|---:|---:|---|"]
    for label, result in results.items():
        score, length = result["score"], result["mean_length"]
        lines.append(f"| {label} | {result['rule']} | {result['n']} | {_percent(score)} | "
                     f"{skipped_text(result)} | {f'{length:.1f}' if math.isfinite(length) else '-'} "
                     f"| {details_text(result)} |")
    return "\n".join(lines)


def write_results(results: dict[str, dict], out_dir: str, run_info: dict | None = None) -> str:
    """Writes OUT/<label>.json per suite, OUT/summary.json and OUT/summary.md; returns the
    table. On several processes only process 0 writes."""
    table = summary_table(results)
    if jax.process_index() != 0:
        return table
    os.makedirs(out_dir, exist_ok=True)
    for label, result in results.items():
        with open(os.path.join(out_dir, label.replace("/", "_") + ".json"), "w") as handle:
            json.dump({**(run_info or {}), **result}, handle, indent=1, allow_nan=True)
    summary = {label: {k: r.get(k) for k in ("score", "n", "skipped", "skip_reasons", "rule",
                                             "mean_length", "item_mean", "metrics")}
               for label, r in results.items()}
    with open(os.path.join(out_dir, "summary.json"), "w") as handle:
        json.dump({**(run_info or {}), "suites": summary}, handle, indent=1, allow_nan=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    return table


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face Qwen2.5-VL directory")
    parser.add_argument("--suite", action="append", required=True,
                        help="LABEL=PATH[;split=..][;config=..][;image_root=..][;circular=..]"
                             "[;multi_image=all|skip] (repeatable)")
    parser.add_argument("--prompt", choices=sorted(prompts_lib.PROMPTS), default="plain")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each suite")
    parser.add_argument("--mesh", default="", help="e.g. fsdp=-1 or data=2,fsdp=4 (default: "
                                                   "one device)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: float32 on CPU, bfloat16 on accelerators")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="image pixel cap (default: the directory's preprocessor_config)")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="datasets cache for parquet reads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import jax.numpy as jnp
    from flax import nnx

    from recap_jax.models.qwen2_5_vl import from_pretrained
    from recap_jax.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
    from recap_jax.policy import check_tokenizer_matches

    args = _parser().parse_args(argv)
    for spec in args.suite:
        parse_suite_spec(spec)  # fail on a bad spec before loading the model
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    mesh = parallel.make_mesh(parallel.parse_mesh_spec(args.mesh)) if args.mesh else None
    model = from_pretrained(args.model, dtype=getattr(jnp, dtype), mesh=mesh)
    processor = Qwen2_5_VLProcessor.from_pretrained(args.model, min_pixels=args.min_pixels,
                                                    max_pixels=args.max_pixels)
    check_tokenizer_matches(processor, model.config)
    graphdef, params = nnx.split(model)
    suites = open_suites(args.suite, limit=args.limit, cache_dir=args.cache_dir)
    results = evaluate_suites(graphdef, params, processor, model.config, suites, prompt=args.prompt,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              mesh=mesh, progress_stream=sys.stderr)
    run_info = {"model": os.path.abspath(args.model), "prompt": args.prompt,
                "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "dtype": dtype}
    print(write_results(results, args.out, run_info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
