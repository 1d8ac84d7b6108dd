"""The main job: forgetting and its prevention, side by side, from one stored warm-start.

    python -m recap_jax.demo --workdir /tmp/recap_demo

1. checks the stored warm-start (assets/demo_warmstart: a tiny Qwen2.5-VL that reads the
   synthetic OCR images and grounds shapes, built by scripts/build_demo_warmstart.py) against
   its SHA256SUMS manifest; a file that does not match is an error naming it;
2. from that warm-start, RL with `reasoning_only` (reasoning prompts only) and with `recap`
   (reasoning RL + grounding RL replay + OCR SFT replay, weighted online by RECAP), the same
   seed and number of steps, one after the other in this process (`recap_jax.train.train`,
   WORKDIR/<method>; compiled programs are shared through JAX's compilation cache in
   WORKDIR/compilation_cache);
3. prints the table of held-out metrics (reasoning accuracy, grounding IoU, OCR exact and
   char F1, image reliance per task) at the warm-start and after each method, with the
   changes, and what of the difference is beyond the records' sampling noise; writes it to
   WORKDIR/comparison.txt (and comparison.json), and plots lambda per objective and the rewards
   over the RL steps to WORKDIR/demo.png.

Every number printed is read from this run's own metrics (WORKDIR/<method>/metrics.jsonl).
Settings: recap_jax.demo_settings (those of experiments/forgetting_in_miniature).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import time

from recap_jax import analysis, demo_settings

# (task, metric, label) of the comparison table, in order; image reliance is in nats per answer
# token (evaluator.Evaluator: the answer's NLL with another record's image minus with its own)
TABLE_METRICS = (
    ("reasoning", "accuracy", "reasoning accuracy"),
    ("grounding", "iou", "grounding IoU"),
    ("ocr", "ocr_exact", "OCR exact match"),
    ("ocr", "ocr_char_f1", "OCR char F1"),
    ("reasoning", "image_reliance", "reasoning image reliance"),
    ("grounding", "image_reliance", "grounding image reliance"),
    ("ocr", "image_reliance", "OCR image reliance"),
)
# metrics in [0, 1] averaged over records: their record-sampling noise is bounded (see
# `record_noise`); the perception metrics the verdict reads
UNIT_METRICS = {"accuracy", "iou", "ocr_exact", "ocr_char_f1"}
PERCEPTION = (("grounding", "iou"), ("ocr", "ocr_exact"), ("ocr", "ocr_char_f1"),
              ("grounding", "image_reliance"), ("ocr", "image_reliance"))


class WarmStartCorrupt(RuntimeError):
    """The stored warm-start does not match its manifest."""


# --------------------------------------------------------------------------- the warm-start


def sha256_of(path: pathlib.Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: pathlib.Path) -> pathlib.Path:
    """Writes DIRECTORY/SHA256SUMS (`sha256sum` format) for every other file in it."""
    directory = pathlib.Path(directory)
    manifest = directory / demo_settings.MANIFEST_NAME
    files = sorted(p for p in directory.iterdir() if p.is_file() and p != manifest)
    manifest.write_text("".join(f"{sha256_of(p)}  {p.name}\n" for p in files))
    return manifest


def verify_manifest(directory: pathlib.Path) -> list[str]:
    """The names of DIRECTORY's files, each checked against DIRECTORY/SHA256SUMS.

    WarmStartCorrupt (naming the file) if the manifest is missing or malformed, a listed file
    is missing or has another checksum, or a file is not listed (it would be read too)."""
    directory = pathlib.Path(directory)
    manifest = directory / demo_settings.MANIFEST_NAME
    rebuild = ("restore it (git checkout -- assets/demo_warmstart) or rebuild it: python "
               "scripts/build_demo_warmstart.py --workdir /tmp/demo_warmstart_build")
    if not manifest.is_file():
        raise WarmStartCorrupt(f"{manifest}: the warm-start's manifest is missing; {rebuild}")
    expected = {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise WarmStartCorrupt(f"{manifest} line {number}: not '<sha256>  <file name>': "
                                   f"{line!r}")
        expected[name] = digest
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise WarmStartCorrupt(f"{path}: listed in {manifest.name} but missing; {rebuild}")
        actual = sha256_of(path)
        if actual != digest:
            raise WarmStartCorrupt(f"{path}: sha256 {actual}, but {manifest.name} says {digest} "
                                   f"(the file is damaged or was changed); {rebuild}")
    unlisted = sorted(p.name for p in directory.iterdir() if p != manifest
                      and p.name not in expected)
    if unlisted:
        raise WarmStartCorrupt(f"{directory}: {', '.join(unlisted)} not listed in "
                               f"{manifest.name} (the loader would read them); remove them or "
                               f"{rebuild}")
    return sorted(expected)


# --------------------------------------------------------------------------- running


def method_config(method: str, warmstart: pathlib.Path, *, steps: int, seed: int,
                  eval_examples: int):
    """configs/demo.py for one RL method from ``warmstart`` (demo_settings.RL + METHODS)."""
    sizes = {f"data.sources.{task}.eval_size": eval_examples
             for task in ("reasoning", "grounding", "ocr")}
    return demo_settings.demo_config(demo_settings.RL, demo_settings.METHODS[method], sizes, {
        "model.path": str(warmstart), "tokenizer.path": str(warmstart), "rl.steps": steps,
        "seed": seed, "eval.num_examples": eval_examples,
        "eval.batch_size": min(64, eval_examples)})


def enable_compilation_cache(directory: pathlib.Path) -> None:
    """JAX's persistent compilation cache in ``directory``, for every program however fast it
    compiles: the second method's sampler, evaluator and shared step pieces are then read
    instead of compiled again (each `train.train` builds its own jitted functions)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def read_run(workdir: pathlib.Path) -> dict:
    """{"before": eval line at RL step 0, "after": the last eval line, "rl": RL step lines}
    of a finished run's metrics.jsonl."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = sorted((line for line in lines if line.get("stage") == "eval"),
                   key=lambda line: line["step"])
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise ValueError(f"{path}: expected an evaluation at RL step 0 and one after RL, found "
                         f"{[e['step'] for e in evals]}")
    return {"before": evals[0], "after": evals[-1],
            "rl": [line for line in lines if line.get("stage") == "rl"]}


# --------------------------------------------------------------------------- the comparison


def record_noise(mean_a: float, mean_b: float, n: int) -> float:
    """An upper bound on the standard error of ``mean_a - mean_b``, two evaluations of a
    metric in [0, 1] averaged over ``n`` records each, taken as independent: a [0, 1]-valued
    score with mean m has variance at most m (1 - m), the Bernoulli case. Seed-to-seed
    variation of RL itself is not in it."""
    if n <= 0:
        raise ValueError(f"record_noise: n must be positive, got {n}")
    clipped = [min(max(m, 0.0), 1.0) for m in (mean_a, mean_b)]
    return math.sqrt(sum(m * (1 - m) for m in clipped) / n)


def comparison(before: dict, after: dict[str, dict]) -> list[dict]:
    """One row per TABLE_METRICS entry present in ``before``: {"task", "metric", "label",
    "before", "after": {method: value}, "change": {method: value}}. ``before`` / ``after``
    hold eval lines ("eval/<task>/<metric>" keys)."""
    rows = []
    for task, metric, label in TABLE_METRICS:
        key = f"eval/{task}/{metric}"
        if key not in before:
            continue
        values = {method: line.get(key, float("nan")) for method, line in after.items()}
        rows.append({"task": task, "metric": metric, "label": label, "before": before[key],
                     "after": values,
                     "change": {m: v - before[key] for m, v in values.items()}})
    return rows


def format_table(rows: list[dict], methods: list[str]) -> str:
    """The rows of `comparison` as a fixed-width table: metric, warm-start, then per method
    the value after RL and its change."""
    head = [f"{'metric':<26}", f"{'warm-start':>10}"]
    head += [f"{m + ' (change)':>26}" for m in methods]
    out = ["  ".join(head), "-" * len("  ".join(head))]
    for row in rows:
        cells = [f"{row['label']:<26}", f"{row['before']:>10.3f}"]
        cells += [f"{row['after'][m]:.3f} ({row['change'][m]:+.3f})".rjust(26) for m in methods]
        out.append("  ".join(cells))
    return "\n".join(out)


def verdict(rows: list[dict], baseline: str, method: str, num_examples: int) -> list[str]:
    """Per perception metric: how much more ``baseline`` lost than ``method``, and whether
    that is beyond twice the records' sampling noise (`record_noise`, [0, 1] metrics only;
    image reliance has no such bound and is reported as measured)."""
    out = []
    for row in rows:
        if (row["task"], row["metric"]) not in PERCEPTION:
            continue
        gap = row["change"][method] - row["change"][baseline]  # > 0: the baseline lost more
        more, less = (baseline, method) if gap >= 0 else (method, baseline)
        text = (f"{row['label']}: {baseline} {row['change'][baseline]:+.3f}, {method} "
                f"{row['change'][method]:+.3f}; {more} lost {abs(gap):.3f} more than {less}")
        if row["metric"] in UNIT_METRICS:  # gap = after[method] - after[baseline]
            noise = record_noise(row["after"][baseline], row["after"][method], num_examples)
            judged = "beyond" if abs(gap) > 2 * noise else "WITHIN"
            text += (f" ({judged} 2 x the record-sampling noise bound, {2 * noise:.3f} with "
                     f"{num_examples} records)")
        out.append(text)
    return out


# --------------------------------------------------------------------------- the plot


def plot(runs: dict[str, list[dict]], path: pathlib.Path, *, smooth: int = 10) -> pathlib.Path:
    """PNG of the RL step lines of each method: lambda per objective (methods whose lambda
    stays 1 are left out and named in the title), the reasoning accuracy reward, the grounding
    IoU reward and the OCR NTP loss (moving averages over ``smooth`` batches of that source)."""
    from matplotlib.figure import Figure  # not registered with pyplot: no backend, no GUI

    fig = Figure(figsize=(18, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = (("reward/reasoning/accuracy", "reasoning accuracy reward"),
              ("reward/grounding/iou", "grounding IoU reward (replay)"),
              ("ntp_loss/ocr/ntp", "OCR NTP loss, nats/token (replay)"))
    constant = []
    for method, lines in runs.items():
        style = "-" if method != "reasoning_only" else "--"
        names = sorted({k[len("weight/"):] for line in lines for k in line
                        if k.startswith("weight/")})
        series = {name: ([line["step"] for line in lines if f"weight/{name}" in line],
                         [line[f"weight/{name}"] for line in lines if f"weight/{name}" in line])
                  for name in names}
        if all(v == 1.0 for _, values in series.values() for v in values):
            constant.append(method)
        else:
            for name, (steps, values) in series.items():
                axes[0].plot(steps, values, style, label=f"{method}: {name}", linewidth=1.2)
        for ax, (key, _) in zip(axes[1:], panels):
            steps = [line["step"] for line in lines if key in line]
            if steps:
                values = analysis.smooth([line[key] for line in lines if key in line], smooth)
                ax.plot(steps, values, style, label=method)
    titles = ["lambda per objective" + (f" ({', '.join(constant)}: 1 throughout)"
                                        if constant else "")]
    titles += [f"{title}, moving avg of {smooth} batches" for _, title in panels]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return pathlib.Path(path)


# --------------------------------------------------------------------------- main


def run_demo(workdir: pathlib.Path, *, warmstart: pathlib.Path, steps: int, seed: int,
             eval_examples: int) -> dict:
    """Everything of the module docstring; returns the comparison rows and the paths."""
    from recap_jax import train

    began = time.perf_counter()
    files = verify_manifest(warmstart)
    print(f"warm-start {warmstart}: {len(files)} files match {demo_settings.MANIFEST_NAME}",
          flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(workdir / "compilation_cache")
    runs, walls = {}, {}
    for method in demo_settings.METHODS:
        print(f"\n=== RL with {method}: {steps} steps, seed {seed} -> {workdir / method}",
              flush=True)
        start = time.perf_counter()
        train.train(method_config(method, warmstart, steps=steps, seed=seed,
                                  eval_examples=eval_examples), str(workdir / method))
        walls[method] = time.perf_counter() - start
        runs[method] = read_run(workdir / method)
    methods = list(runs)
    before = runs[methods[0]]["before"]
    # every run evaluated the same warm-start at its RL step 0 (greedy, the same records)
    differ = sorted({key for m in methods[1:] for key, value in runs[m]["before"].items()
                     if key.startswith("eval/") and key in before
                     and not math.isclose(value, before[key], rel_tol=1e-4, abs_tol=1e-4)})
    if differ:
        print(f"note: the methods' evaluations of the warm-start differ in {', '.join(differ)}; "
              f"the table's warm-start column is {methods[0]}'s", flush=True)
    rows = comparison(before, {m: runs[m]["after"] for m in methods})
    table = format_table(rows, methods)
    findings = verdict(rows, "reasoning_only", "recap", eval_examples)
    png = plot({m: runs[m]["rl"] for m in methods}, workdir / "demo.png")
    report = "\n".join([
        f"Held-out evaluation ({eval_examples} records per task, greedy), warm-start and after "
        f"{steps} RL steps of each method (seed {seed}):", "", table, "",
        "Image reliance: nats per answer token that another record's image adds to the "
        "reference answer's NLL (~0: the model ignores its images).", "",
        "What reasoning_only lost beyond recap on perception (this run, one seed):",
        *[f"  {line}" for line in findings],
        "", "RL wall time: " + ", ".join(f"{m} {w:.0f} s" for m, w in walls.items())
        + f"; total {time.perf_counter() - began:.0f} s",
        f"plot: {png}"])
    print("\n" + report, flush=True)
    (workdir / "comparison.txt").write_text(report + "\n")
    (workdir / "comparison.json").write_text(json.dumps(
        {"steps": steps, "seed": seed, "eval_examples": eval_examples, "rows": rows,
         "findings": findings, "wall_s": walls}, indent=1))
    return {"rows": rows, "findings": findings, "plot": png}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--warmstart", type=pathlib.Path, default=demo_settings.WARMSTART_DIR,
                        help="the stored warm-start (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=demo_settings.DEMO_STEPS,
                        help="RL steps per method (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-examples", type=int, default=demo_settings.DEMO_EVAL_EXAMPLES,
                        help="held-out records per task (default: %(default)s)")
    args = parser.parse_args(argv)
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity("warning")  # orbax logs every file operation at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        run_demo(args.workdir, warmstart=args.warmstart, steps=args.steps, seed=args.seed,
                 eval_examples=args.eval_examples)
    except WarmStartCorrupt as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
