"""Replay pipeline throughput (examples/s) per source on CPU, against a plain python loop.

    python benchmarks/replay_throughput.py [--examples 256] [--batch 8] [--workers 2]
                                           [--out FILE.md]

For each source the same work - load the record (decode), resize/patchify, chat template +
tokenize, M-RoPE positions - is timed two ways in one run:
  reference  a plain python loop over the records, one at a time, no batching;
  replay     recap_jax.data.replay (tf.data: parallel map, padded batch, prefetch, collate
             into bucket-padded numpy batches), single-source round robin.
Sources: the three synthetic tasks at their default sizes (tiny demo images), a RefCOCO-style
jsonl with 640x480 JPEGs on disk and a ThinkLite-style parquet with 448x448 JPEG bytes
(default Qwen2.5-VL min/max pixels, so real-sized patch lists), and the hybrid mix of the three
synthetic tasks (uniform). The tokenizer is the demo byte-level BPE (build_demo_tokenizer).
The "demo step consumption" column is left for the demo train step's examples/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from recap_jax.data import encode, replay, sources, synthetic, tasks  # noqa: E402
from recap_jax.models.qwen2_5_vl import config as config_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import processor as processor_lib  # noqa: E402

VOCAB = 1024
MACHINE = "CPU, 2 cores, CI-class machine"


def demo_processor(workdir: str):
    corpus = []
    for task in synthetic.SYNTHETIC_TASKS:
        for record in synthetic.generate(task, "train", 100):
            corpus.append(tasks.get_task(task).format_prompt(record.question) + " "
                          + record.answer_text)
    tokenizer = processor_lib.build_demo_tokenizer(corpus * 4, VOCAB, workdir)
    return processor_lib.Qwen2_5_VLProcessor(tokenizer)


def photo_like(rng, height, width):
    """A smooth random image (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def disk_sources(workdir: str, count: int):
    rng = np.random.default_rng(0)
    root = os.path.join(workdir, "coco")
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(count):
        photo_like(rng, 480, 640).save(os.path.join(root, f"{i}.jpg"), quality=90)
        rows.append({"image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>" + tasks.GROUNDING_QUESTION.format(
                phrase=f"the object number {i}")}, {"from": "gpt", "value": "[10, 20, 200, 300]"}]})
    jsonl = os.path.join(workdir, "refcoco.jsonl")
    with open(jsonl, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"problem": f"What is {i} + {i}?", "answer": str(2 * i),
         "image": {"bytes": jpeg_bytes(photo_like(rng, 448, 448)), "path": None}}
        for i in range(count)])
    parquet = os.path.join(workdir, "thinklite.parquet")
    pq.write_table(table, parquet, row_group_size=64)
    return [("refcoco (jsonl, 640x480 jpg)", sources.refcoco(jsonl, image_root=root)),
            ("thinklite (parquet, 448x448 jpg)", sources.thinklite(parquet))]


def reference_rate(source, encoder, count: int) -> float:
    task = tasks.get_task(source.name)
    stream = replay.SourceStream(source, seed=0)
    start = time.perf_counter()
    for position in range(count):
        encoder.encode(task, source.load(stream.index_at(position)))
    return count / (time.perf_counter() - start)


def replay_rate(source_list, processor, model_config, config, count: int) -> float:
    with replay.make_replay(source_list, processor, model_config, config) as iterator:
        for _ in range(2):  # warm-up: pipeline start, first prefetch
            next(iterator)
        batches = max(1, count // config.batch_size)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * config.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="tf.data num_parallel_calls")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="replay_bench_")
    processor = demo_processor(os.path.join(workdir, "tokenizer"))
    model_config = config_lib.tiny(VOCAB)
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=8192,
                                   max_answer_tokens=1024)
    config = replay.ReplayConfig(batch_size=args.batch, strategy="round_robin",
                                 num_parallel_calls=args.workers)
    rows = []
    named = [(f"{task} (synthetic {h}x{w})", synthetic.SyntheticSource(task, size=2000))
             for task, (h, w) in synthetic.DEFAULT_IMAGE_SIZES.items()]
    named += disk_sources(workdir, min(args.examples, 128))
    for label, source in named:
        reference = reference_rate(source, encoder, args.examples)
        ours = replay_rate([source], processor, model_config, config, args.examples)
        rows.append((label, reference, ours))
        print(f"{label:36s} reference {reference:8.1f} ex/s   replay {ours:8.1f} ex/s", flush=True)
    mix = [synthetic.SyntheticSource(task, size=2000) for task in synthetic.SYNTHETIC_TASKS]
    mixed_config = replay.ReplayConfig(batch_size=args.batch, strategy="uniform",
                                       num_parallel_calls=args.workers)
    reference = sum(reference_rate(s, encoder, args.examples // 3) ** -1 for s in mix) / 3
    ours = replay_rate(mix, processor, model_config, mixed_config, args.examples)
    rows.append(("hybrid mix, uniform (3 synthetic)", 1 / reference, ours))

    load = os.getloadavg()[0]
    header = (f"Replay throughput, examples/s ({MACHINE}; {platform.processor() or 'cpu'}, "
              f"python {platform.python_version()}; 1-min load average {load_at_start:.1f} at "
              f"start, {load:.1f} at end); batch {args.batch}, num_parallel_calls "
              f"{args.workers}, chunk_size {config.chunk_size}, {args.examples} examples per "
              "row.\n"
              "reference = plain python loop (load + encode, one at a time, nothing overlapped "
              "with training); replay = tf.data pipeline incl. batching, collate and bucket "
              "padding, running in background threads (prefetch), so a train step only waits "
              "for it when the step consumes examples faster than the replay column.\n\n")
    table = ["| source | reference ex/s | replay ex/s | ratio | demo step consumption ex/s |",
             "|---|---:|---:|---:|---|"]
    table += [f"| {label} | {ref:.1f} | {ours:.1f} | {ours / ref:.2f}x | see RESULTS.md |"
              for label, ref, ours in rows]
    text = header + "\n".join(table) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("# Replay pipeline throughput\n\n" + text)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
