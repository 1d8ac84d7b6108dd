#!/usr/bin/env python
"""The paper's finding in miniature: does reasoning-only RL forget perception, and does RECAP
keep it while matching reasoning?

    python experiments/forgetting_in_miniature/run.py --out /tmp/fim_sweep
    python experiments/forgetting_in_miniature/run.py --out DIR --seeds 0,1,2 \
        --methods reasoning_only,uniform,recap,recap_paper

1. Warm-starts ONCE, in two stages of `python -m recap_jax.train --config configs/demo.py`
   (SFT only, rl.steps=0): OCR alone (OCR_FIRST) into DIR/ocr_first_run, then the mixed SFT
   (WARMSTART) from that model into DIR/warmstart_run, whose step-0 evaluation is the
   "warm-start" row of the tables.
2. Runs every method x seed from that same warm-start (model.path = tokenizer.path =
   DIR/warmstart_run/warmstart, sft.steps=0), each in DIR/<method>/seed_<s>, as a subprocess
   (memory growth stays out of this process; a crash is reported and the sweep goes on).
3. Writes RESULTS.md and results.json next to this file (--results-dir to change): eval
   metrics at the warm-start and after RL (mean +- std over seeds), lambda trajectories,
   completion lengths, rewards seen during RL.

Resume-friendly: a run whose workdir holds DONE.json with the same overrides is skipped; an
interrupted run is restarted in its workdir (recap_jax.train resumes from its checkpoints);
a DONE.json with different overrides stops the sweep (use another --out). --report-only
rebuilds the tables from what is on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = REPO / "configs" / "demo.py"

# --------------------------------------------------------------------------- overrides
# Everything not listed here is configs/demo.py. Values are passed as --config.<key>=<value>.

# Both stages (the RL runs must evaluate exactly what the warm-start evaluated).
SHARED = {
    # 256 held-out records per task instead of 64: the differences we look for are a few
    # points, and with 64 records one binary metric has a standard error of ~0.06.
    "data.sources.reasoning.eval_size": 256,
    "data.sources.grounding.eval_size": 256,
    "data.sources.ocr.eval_size": 256,
    "eval.num_examples": 256,
    "eval.batch_size": 64,  # fewer, larger greedy-decoding calls (CPU)
    "log.tensorboard": False,  # metrics.jsonl is all we read
    # Grounding and OCR on the "grid" layout (one shape / one character per 28 px merged-patch
    # cell). On the default free layout the warm-started tiny model never used the image (NTP
    # identical with shuffled images, vision features collapsed to one constant vector), so
    # there was no perception to forget: RESULTS_free_layout.md. On the grid it reads the OCR
    # images (NTP 2.1 with the right image, 3.8 with another record's image, at 1000 steps).
    "data.sources.grounding.layout": "grid",
    "data.sources.ocr.layout": "grid",
}

# Stage 1 of the warm-start: OCR alone, from scratch (demo tokenizer). In every mixed warm-start
# we tried (OCR a third of the batch for 1500 steps, or 60 %) OCR stayed on a plateau at ~2.15
# nats per token (answers independent of the character in the cell, char F1 ~0.1); OCR alone
# leaves it after ~230 steps and reads every string by step 800 (README.md, "Pilots").
# (the same stage builds the README demo's stored warm-start: recap_jax.demo_settings)
from recap_jax.demo_settings import OCR_FIRST  # noqa: E402

# Stage 2, the warm-start proper: the demo's mixed SFT, from stage 1's model and tokenizer
# (model.path / tokenizer.path are added). See README.md / RESULTS.md for the pilots behind
# these values.
WARMSTART = {
    "rl.steps": 0,  # SFT + the step-0 evaluation only
    # 1500 steps instead of the demo's 300 (~12-15 min on 2 shared cores). Free-layout pilots
    # (RESULTS_free_layout.md): neither 300 nor 1000-1500 steps, nor lr 5e-4..1e-2, batch 16,
    # warm-up 30 %, a larger model or OCR upscaling made the model use the image. Grid-layout
    # pilot: at 1000 steps OCR reading had started (NTP still falling), hence 1500.
    "sft.steps": 1500,
    "checkpoint.every_steps": 200,  # resumable if interrupted
}

# Every RL run (one per method and seed).
RL = {
    "sft.steps": 0,  # model.path / tokenizer.path are added: DIR/warmstart_run/warmstart
    "rl.steps": 150,  # 50 batches per source under round robin (the demo: 20); ~1-1.5 min
    # The demo's 2e-5 barely moves the tiny model. Pilots from this warm-start (reasoning_only,
    # seed 0, 150 steps; README.md): 1e-3 lowers reasoning itself (acc 0.438 -> 0.395) as well
    # as grounding (IoU 0.160 -> 0.088); 1e-4 improves reasoning (0.453) and loses little IoU
    # (0.146); 3e-4 keeps reasoning (0.445) and loses IoU 0.160 -> 0.120: the paper's regime
    # (RL that helps or holds reasoning while perception erodes).
    "rl.learning_rate": 3e-4,
    # W scaled to the run: an objective's history only advances on steps where its source is
    # drawn (every 3rd step under round robin), and variant `paper` keeps lambda = 1 until
    # 2W values exist: W = 10 would leave it at 1 for the first 60 of 150 steps.
    "recap.window": 5,
    "checkpoint.every_steps": 50,
    "log.every_steps": 25,
}

# rl.method and its own settings, per label. Shares of modomodo are per source in source-id
# order (reasoning, grounding, ocr); the paper's shares are for its four RLVR-only sources, so
# we give the target (reasoning) half and split the rest (its other trait, the frozen vision
# tower, comes with the method).
METHODS = {
    "reasoning_only": {"rl.method": "reasoning_only"},
    "uniform": {"rl.method": "uniform"},
    "propmix": {"rl.method": "propmix"},
    "coreset": {"rl.method": "coreset"},
    "lwf": {"rl.method": "lwf"},
    "modomodo": {"rl.method": "modomodo", "data.modomodo_shares": "0.5,0.25,0.25"},
    # rl.log_lambda_effect: the cosine between the update's gradient and the one lambda = 1
    # would give, logged per step (one more backward pass; the update itself is unchanged)
    "recap": {"rl.method": "recap", "recap.variant": "released", "rl.log_lambda_effect": True},
    "recap_paper": {"rl.method": "recap", "recap.variant": "paper", "rl.log_lambda_effect": True},
}

# The paper's ablations (recap-method.md; the released recipes sweep alpha, T and W), each a
# table of RESULTS.md: {name: (what varies, {label: (setting shown, overrides)})}. Every row
# changes one setting of the base run `recap` (variant released, alpha 0.5, T 5, W 5,
# weighting reward), which appears in each table under its own setting. W is scaled to the
# run's length like RL["recap.window"] (the recipes' 10 / 25 / 50 over a few hundred steps;
# here 150 steps, a source every third step).
_RECAP = METHODS["recap"]
ABLATIONS = {
    "alpha": ("alpha (share of convergence c against instability i; anneal: 1 - step / 150)", {
        "recap_alpha0.25": ("0.25", {**_RECAP, "recap.alpha": 0.25}),
        "recap": ("0.5 (base)", _RECAP),
        "recap_alpha0.75": ("0.75", {**_RECAP, "recap.alpha": 0.75}),
        "recap_alpha1": ("1", {**_RECAP, "recap.alpha": 1.0}),
        "recap_alpha_anneal": ("anneal", {**_RECAP, "recap.alpha": "anneal"}),
    }),
    "temperature": ("softmax temperature T", {
        "recap_T1": ("1", {**_RECAP, "recap.temperature": 1.0}),
        "recap": ("5 (base)", _RECAP),
        "recap_T50": ("50", {**_RECAP, "recap.temperature": 50.0}),
    }),
    "window": ("window W (values per objective per window)", {
        "recap": ("5 (base)", _RECAP),
        "recap_W12": ("12", {**_RECAP, "recap.window": 12}),
        "recap_W25": ("25", {**_RECAP, "recap.window": 25}),
    }),
    "weighting": ("how lambda weights a reward objective (rl.weighting) in both variants", {
        "recap": ("released, reward (base)", _RECAP),
        "recap_loss": ("released, loss", {**_RECAP, "rl.weighting": "loss"}),
        "recap_paper": ("paper, reward", METHODS["recap_paper"]),
        "recap_paper_loss": ("paper, loss", {**METHODS["recap_paper"], "rl.weighting": "loss"}),
    }),
    "dwa": ("the update rule: RECAP against DWA (Liu et al. 2019, T 2) and lambda = 1", {
        "uniform": ("lambda = 1 (uniform)", METHODS["uniform"]),
        "recap": ("RECAP released (base)", _RECAP),
        "dwa": ("DWA", {"rl.method": "recap", "recap.variant": "dwa", "rl.log_lambda_effect": True}),
    }),
}
# every runnable label: the methods, then the ablation rows that are not methods
RUNS = {**METHODS, **{label: overrides for _, rows in ABLATIONS.values()
                      for label, (_, overrides) in rows.items()}}
DEFAULT_SEEDS = (0, 1, 2)
TASK_METRICS = (("reasoning", "accuracy"), ("reasoning", "format_think"), ("grounding", "iou"),
                ("grounding", "format_answer"), ("ocr", "ocr_char_f1"), ("ocr", "ocr_exact"))
METRIC_LABELS = {"accuracy": "acc", "format_think": "format", "iou": "IoU",
                 "format_answer": "format", "ocr_char_f1": "char F1", "ocr_exact": "exact"}
TRAJECTORY_POINTS = 6  # lambda reported at this many evenly spaced RL steps
DONE_FILE = "DONE.json"


# --------------------------------------------------------------------------- running


def command_line(workdir: Path, overrides: dict, module: str = "recap_jax.train",
                 extra: tuple = ()) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [sys.executable, "-m", module, f"--config={CONFIG}", f"--workdir={workdir}",
            *extra, *flags]


def _normalised(overrides: dict) -> dict:
    return json.loads(json.dumps(overrides, sort_keys=True, default=str))


def is_done(workdir: Path, overrides: dict) -> bool:
    """True if ``workdir`` finished with these overrides; SystemExit if with others."""
    marker = workdir / DONE_FILE
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    if done.get("overrides") != _normalised(overrides):
        raise SystemExit(f"{marker} records a run with other overrides than this run.py's:\n"
                         f"  on disk: {done.get('overrides')}\n  now:     "
                         f"{_normalised(overrides)}\nuse another --out (or delete {workdir}).")
    return True


def run_training(label: str, workdir: Path, overrides: dict) -> bool:
    """Runs (or resumes) one training job; True when it finished."""
    if is_done(workdir, overrides):
        print(f"[skip] {label}: finished earlier ({workdir})", flush=True)
        return True
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "train.log"
    print(f"[run ] {label} -> {workdir} (log {log_path})", flush=True)
    began = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {datetime.datetime.now().isoformat()} {' '.join(command_line(workdir, overrides))}\n")
        log.flush()
        code = subprocess.call(command_line(workdir, overrides), cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
    wall = time.time() - began
    if code != 0:
        print(f"[FAIL] {label}: exit {code} after {wall:.0f} s; last lines of {log_path}:\n"
              + "".join(log_path.read_text().splitlines(True)[-15:]), flush=True)
        return False
    (workdir / DONE_FILE).write_text(json.dumps(
        {"overrides": _normalised(overrides), "wall_s": wall,
         "finished": datetime.datetime.now().isoformat()}, indent=1))
    print(f"[done] {label}: {wall:.0f} s", flush=True)
    return True


def measure_image_reliance(label: str, workdir: Path, overrides: dict) -> None:
    """The teacher-forced metrics (answer NLL with the own / another record's image,
    evaluator.Evaluator) of a finished run's last checkpoint, once: `recap_jax.evaluate
    --nogreedy` with the run's overrides. Runs whose eval lines already hold them (the
    evaluator computes them by default now) need nothing, but the file keeps the report
    uniform for runs made before."""
    if not (workdir / DONE_FILE).exists() or _teacher_forced_file(workdir) is not None:
        return
    evals = _evals(read_metrics(workdir))
    if evals and any(k.endswith("/image_reliance") for k in evals[max(evals)]):
        return  # the run's own last evaluation has them
    command = command_line(workdir, overrides, "recap_jax.evaluate", ("--nogreedy",))
    with open(workdir / "evaluate.log", "a", encoding="utf-8") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    print(f"[{'eval' if code == 0 else 'FAIL'}] {label}: image reliance "
          f"({'exit ' + str(code) if code else 'done'})", flush=True)


def _teacher_forced_file(workdir: Path) -> Path | None:
    files = sorted((workdir / "eval").glob("checkpoint_*_teacher_forced.json"),
                   key=lambda p: int(p.name.split("_")[1]))
    return files[-1] if files else None


def teacher_forced_evals(workdir: Path) -> dict:
    """{"eval/<task>/<metric>": value} of the newest --nogreedy evaluation ({} if none)."""
    path = _teacher_forced_file(workdir)
    if path is None:
        return {}
    tasks = json.loads(path.read_text())["tasks"]
    return {f"eval/{task}/{metric}": value for task, table in tasks.items()
            for metric, value in table.items() if metric != "num_examples"}


def ocr_first_overrides() -> dict:
    return {**SHARED, **OCR_FIRST}


def warmstart_overrides(out: Path) -> dict:
    first = out / "ocr_first_run" / "warmstart"
    return {**SHARED, **WARMSTART, "model.path": str(first), "tokenizer.path": str(first)}


def rl_overrides(out: Path, method: str, seed: int) -> dict:
    warm = out / "warmstart_run" / "warmstart"
    return {**SHARED, **RL, "model.path": str(warm), "tokenizer.path": str(warm),
            **RUNS[method], "seed": seed}


# --------------------------------------------------------------------------- reading runs


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _evals(lines: list[dict]) -> dict[int, dict]:
    return {line["step"]: line for line in lines if line.get("stage") == "eval"}


def summarise_run(workdir: Path) -> dict | None:
    """Eval before/after, lambda trajectory, completion lengths and rewards of one RL run."""
    lines = read_metrics(workdir)
    evals = _evals(lines)
    rl = [line for line in lines if line.get("stage") == "rl"]
    if 0 not in evals or not rl or max(evals) != rl[-1]["step"]:
        return None
    last = rl[-1]["step"]
    weights = [k for k in rl[0] if k.startswith("weight/")]  # objective order
    points = sorted({max(1, round(last * i / (TRAJECTORY_POINTS - 1)))
                     for i in range(TRAJECTORY_POINTS)})
    by_step = {line["step"]: line for line in rl}
    reasoning_steps = [line for line in rl if line.get("source") == "reasoning"]
    tail = reasoning_steps[-max(1, len(reasoning_steps) // 5):]
    rewards = {}
    for line in rl:
        for key, value in line.items():
            if key.startswith(("reward/", "ntp_loss/")):
                rewards.setdefault(key, []).append(value)
    done = workdir / DONE_FILE
    return {
        "before": {k: v for k, v in evals[0].items() if k.startswith("eval/")},
        # a --nogreedy evaluation of the last checkpoint fills in what the eval line lacks
        "after": {**teacher_forced_evals(workdir),
                  **{k: v for k, v in evals[last].items() if k.startswith("eval/")}},
        "rl_steps": last,
        "source_counts": {s: sum(line.get("source") == s for line in rl)
                          for s in sorted({line.get("source") for line in rl})},
        "weights": {str(step): {k.split("/", 1)[1]: by_step[step][k] for k in weights}
                    for step in points if step in by_step},
        "rl_completion_length_reasoning": _mean([x["completion_length_mean"]
                                                 for x in reasoning_steps]),
        "rl_completion_length_reasoning_last20pct": _mean([x["completion_length_mean"]
                                                           for x in tail]),
        "lambda_range": lambda_ranges(rl, weights),
        "lambda_span": {"min": min((r["min"] for r in lambda_ranges(rl, weights).values()), default=1.0),
                        "max": max((r["max"] for r in lambda_ranges(rl, weights).values()), default=1.0)},
        "lambda_effect": lambda_effect(rl),
        "reward_first_half": {k: _mean(v[:len(v) // 2]) for k, v in rewards.items()},
        "reward_second_half": {k: _mean(v[len(v) // 2:]) for k, v in rewards.items()},
        "wall_s": json.loads(done.read_text())["wall_s"] if done.exists() else None,
    }


def lambda_ranges(rl: list[dict], weight_keys: list[str]) -> dict:
    """{objective: {"min", "max"}} of the lambda that weighted the steps of the run."""
    ranges = {}
    for key in weight_keys:
        values = [line[key] for line in rl if key in line and math.isfinite(line[key])]
        if values:
            ranges[key.split("/", 1)[1]] = {"min": min(values), "max": max(values)}
    return ranges


def lambda_effect(rl: list[dict]) -> dict:
    """What lambda changed in the update (issue: "why RECAP does or does not act"), over the
    RL-objective steps (those with a reward; on an SFT step lambda only scales the loss):
    ``advantage_change`` = ||A(lambda) - A(1)|| / ||A(1)|| and ``lambda_gradient_cosine``, the
    cosine between the gradient with the step's lambda and with lambda = 1 (logged with
    rl.log_lambda_effect). Mean, and the extreme (max change / min cosine)."""
    reward_steps = [line for line in rl if any(k.startswith("reward/") for k in line)]
    out = {}
    for key, extreme in (("advantage_change", max), ("lambda_gradient_cosine", min)):
        values = [line[key] for line in reward_steps if key in line and math.isfinite(line[key])]
        if values:
            out[key] = {"mean": _mean(values), "extreme": extreme(values)}
    norms = [line["grad_norm"] for line in reward_steps if "grad_norm" in line]
    if norms:  # lambda = 0 on every objective that varies within a group leaves no gradient
        out["no_gradient_fraction"] = sum(n == 0 for n in norms) / len(norms)
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _std(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return float("nan")
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[dict]) -> dict:
    """Mean and std (over seeds, ddof=1) of every number of the per-run summaries."""
    def walk(items):
        first = items[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(k in item for item in items)]
            return {k: walk([item[k] for item in items]) for k in keys}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return {"mean": _mean(items), "std": _std(items), "n": len(items)}
        return None
    return walk(runs)


# --------------------------------------------------------------------------- report


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "-"
    if not math.isfinite(stat["std"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _delta(after: dict | None, before: float | None) -> str:
    if not after or before is None or not math.isfinite(after["mean"]):
        return "-"
    return f"{after['mean'] - before:+.3f}"


def _metric_label(task: str, metric: str) -> str:
    return f"{task} {METRIC_LABELS[metric]}"


def render_markdown(results: dict) -> str:
    warm = results["warmstart"]
    methods = {label: entry for label, entry in results["methods"].items() if label in METHODS}
    out = ["# Forgetting in miniature: results", "",
           (f"Generated by `{results['command']}` on {results['generated']} "
           f"(machine: {results['machine']})."), "",
           ("Each method starts from the same warm-start and runs with the seeds listed; values "
           "are mean ± std over seeds (sample std); evaluation is greedy decoding on "
           f"{SHARED['eval.num_examples']} held-out records per task."), ""]
    out += ["## Eval at the warm-start and after RL", "",
            "| method | seeds | " + " | ".join(_metric_label(t, m) for t, m in TASK_METRICS) + " |",
            "|---|---|" + "---|" * len(TASK_METRICS)]
    before = warm.get("eval", {})
    out.append("| warm-start (RL step 0) | - | " + " | ".join(
        f"{before.get(f'eval/{t}/{m}', float('nan')):.3f}" for t, m in TASK_METRICS) + " |")
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if not agg:
            out.append(f"| {label} | - | not run |" + " |" * (len(TASK_METRICS) - 1))
            continue
        cells = [_fmt(agg["after"].get(f"eval/{t}/{m}")) for t, m in TASK_METRICS]
        out.append(f"| {label} | {','.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |")
    out += ["", "Change from the warm-start (mean over seeds):", "",
            "| method | " + " | ".join(f"Δ {_metric_label(t, m)}" for t, m in TASK_METRICS) + " |",
            "|---|" + "---|" * len(TASK_METRICS)]
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if agg:
            out.append(f"| {label} | " + " | ".join(
                _delta(agg["after"].get(f"eval/{t}/{m}"), before.get(f"eval/{t}/{m}"))
                for t, m in TASK_METRICS) + " |")
    out += ["", "## Does the model still look? Image reliance (nats per answer token)", "",
            ("Teacher-forced NLL of the held-out reference answers with the record's own image, "
             "and how much higher it is with another record's image of the same size "
             "(`image_reliance`, evaluator.Evaluator): about 0 for a model that ignores images. A "
             "direct measure of use of the image, which greedy metrics of a weak model (IoU "
             "near 0, OCR F1 near chance) hardly resolve."), "",
            "| method | " + " | ".join(f"{t} {m}" for t, m in RELIANCE_METRICS) + " |",
            "|---|" + "---|" * len(RELIANCE_METRICS)]
    out.append("| warm-start | " + " | ".join(
        f"{before.get(f'eval/{t}/{m}', float('nan')):.3f}" for t, m in RELIANCE_METRICS) + " |")
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if agg:
            out.append(f"| {label} | " + " | ".join(
                f"{_fmt(agg['after'].get(f'eval/{t}/{m}'))} "
                f"({_delta(agg['after'].get(f'eval/{t}/{m}'), before.get(f'eval/{t}/{m}'))})"
                for t, m in RELIANCE_METRICS) + " |")
    out += ["", "(in brackets: the change from the warm-start)"]
    out += ["", "## Completion lengths (tokens)", "",
            ("| method | RL reasoning samples (all steps) | RL reasoning (last 20%) | eval reasoning "
            "| eval grounding | eval OCR |"), "|---|---|---|---|---|---|"]
    out.append("| warm-start | - | - | " + " | ".join(
        f"{before.get(f'eval/{t}/completion_length', float('nan')):.2f}"
        for t in ("reasoning", "grounding", "ocr")) + " |")
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if agg:
            out.append(f"| {label} | {_fmt(agg['rl_completion_length_reasoning'], 2)} | "
                       f"{_fmt(agg['rl_completion_length_reasoning_last20pct'], 2)} | " + " | ".join(
                           _fmt(agg["after"].get(f"eval/{t}/completion_length"), 2)
                           for t in ("reasoning", "grounding", "ocr")) + " |")
    out += ["", "## Objective weights lambda over RL (mean over seeds)", ""]
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if not agg or not label.startswith("recap"):
            continue
        steps = sorted(agg["weights"], key=int)
        objectives = list(agg["weights"][steps[0]]) if steps else []
        out += [f"### {label}", "", "| RL step | " + " | ".join(objectives) + " |",
                "|---|" + "---|" * len(objectives)]
        for step in steps:
            out.append(f"| {step} | " + " | ".join(
                _fmt(agg["weights"][step][o], 3) for o in objectives) + " |")
        out.append("")
    out += ["## Rewards seen during RL (batch means; first half -> second half of the run)", "",
            "| method | " + " | ".join(REWARD_KEYS) + " |", "|---|" + "---|" * len(REWARD_KEYS)]
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        if agg:
            cells = []
            for key in REWARD_KEYS:
                first = agg["reward_first_half"].get(key)
                second = agg["reward_second_half"].get(key)
                cells.append(f"{first['mean']:.3f} -> {second['mean']:.3f}" if first and second
                             else "-")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "## Runs", "",
            ("| method | seeds finished | seeds failed/missing | RL steps | batches per source "
            "(seed 0) | wall s per run |"), "|---|---|---|---|---|---|"]
    for label, entry in methods.items():
        agg = entry.get("aggregate")
        counts = entry["runs"][0]["source_counts"] if entry.get("runs") else {}
        out.append(f"| {label} | {','.join(map(str, entry['seeds'])) or '-'} | "
                   f"{','.join(map(str, entry['missing'])) or '-'} | "
                   f"{_fmt(agg['rl_steps'], 0) if agg else '-'} | "
                   f"{', '.join(f'{k} {v}' for k, v in counts.items()) or '-'} | "
                   f"{_fmt(agg['wall_s'], 0) if agg and agg.get('wall_s') else '-'} |")
    seconds = lambda key: warm.get(key) and round(warm[key])  # noqa: E731
    out += ["", f"Warm-start: stage 1 (OCR only) {seconds('ocr_first_wall_s')} s, stage 2 (mixed) "
                f"{seconds('wall_s')} s.", ""]
    out += render_ablations(results)
    return "\n".join(out)


ABLATION_METRICS = (("reasoning", "accuracy"), ("grounding", "iou"), ("ocr", "ocr_exact"),
                    ("grounding", "image_reliance"), ("ocr", "image_reliance"))


def _ablation_row(setting: str, entry: dict | None, before: dict) -> str:
    agg = entry.get("aggregate") if entry else None
    if not agg:
        return f"| {setting} | - | not run |" + " |" * (len(ABLATION_METRICS) + 3)
    cells = [f"{_fmt(agg['after'].get(f'eval/{t}/{m}'))} "
             f"({_delta(agg['after'].get(f'eval/{t}/{m}'), before.get(f'eval/{t}/{m}'))})"
             for t, m in ABLATION_METRICS]
    span = agg.get("lambda_span")
    cells.append(f"{span['min']['mean']:.3f} – {span['max']['mean']:.3f}" if span else "-")
    effect = agg.get("lambda_effect", {})
    cosine, change = effect.get("lambda_gradient_cosine"), effect.get("advantage_change")
    cells.append(f"{cosine['mean']['mean']:.4f} ({cosine['extreme']['mean']:.3f})" if cosine else "-")
    cells.append(f"{change['mean']['mean']:.3f} ({change['extreme']['mean']:.3f})" if change else "-")
    no_gradient = effect.get("no_gradient_fraction")
    cells.append(f"{no_gradient['mean']:.2f}" if no_gradient else "-")
    return f"| {setting} | {','.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |"


def render_ablations(results: dict) -> list[str]:
    """One table per ablation of ABLATIONS that has a finished run, then the lambda range of
    every objective in every RECAP row."""
    methods, before = results["methods"], results["warmstart"].get("eval", {})
    if not any(methods.get(label, {}).get("aggregate") for _, rows in ABLATIONS.values()
               for label in rows if label not in METHODS):
        return []
    out = ["## Ablations", "",
           ("Each row changes one setting of `recap` (variant released, alpha 0.5, T 5, W 5, "
            "rl.weighting reward; all else as the methods above) and runs the same seeds from the "
            "same warm-start. Metrics after RL, mean ± std over seeds (change from the warm-start "
            "in brackets). lambda: the lowest and the highest weight any objective had at any "
            "step (mean over seeds). Gradient cosine: between the update's gradient with the "
            "step's lambda and with lambda = 1, mean over the RL-objective steps (the lowest in "
            "brackets; 1 also when one of the two gradients is 0); advantage change: "
            "||A(lambda) - A(1)|| / ||A(1)||, mean (the highest; 0 under `loss` weighting, where "
            "lambda weights the objectives' losses, not the advantages); steps without gradient: "
            "the fraction of RL-objective steps whose gradient was exactly 0 (lambda = 0 on every "
            "objective whose rewards vary within a group, or, also at lambda = 1, no group with "
            "varying rewards)."),
           ""]
    header = (["setting", "seeds"] + [f"{t} {METRIC_LABELS.get(m, m)}" for t, m in ABLATION_METRICS]
              + ["lambda min – max", "gradient cosine", "advantage change", "steps without gradient"])
    for name, (varies, rows) in ABLATIONS.items():
        out += [f"### {name}: {varies}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        out.append(_ablation_row("reasoning_only (reference)", methods.get("reasoning_only"), before))
        for label, (setting, _) in rows.items():
            out.append(_ablation_row(f"{setting} (`{label}`)", methods.get(label), before))
        out.append("")
    recap_rows = [label for label in RUNS if RUNS[label].get("rl.method") == "recap"
                  and (methods.get(label) or {}).get("aggregate")]
    objectives = list(methods[recap_rows[0]]["aggregate"]["lambda_range"]) if recap_rows else []
    out += ["### lambda reached per objective (min – max over the run, mean over seeds)", "",
            "| run | " + " | ".join(objectives) + " |", "|---|" + "---|" * len(objectives)]
    for label in recap_rows:
        ranges = methods[label]["aggregate"]["lambda_range"]
        out.append(f"| {label} | " + " | ".join(
            f"{ranges[o]['min']['mean']:.3f} – {ranges[o]['max']['mean']:.3f}" if o in ranges else "-"
            for o in objectives) + " |")
    out += ["", "### Settings of every run (beyond `configs/demo.py`, SHARED and RL of run.py)", "",
            "| run | overrides |", "|---|---|"]
    labels = dict.fromkeys(["reasoning_only"] + [lb for _, rows in ABLATIONS.values() for lb in rows])
    for label in labels:
        if label in methods:
            out.append(f"| {label} | " + ", ".join(f"`{k}={v}`" for k, v in RUNS[label].items()) + " |")
    out.append("")
    return out


RELIANCE_METRICS = (("grounding", "image_reliance"), ("ocr", "image_reliance"),
                    ("reasoning", "image_reliance"), ("grounding", "answer_nll"),
                    ("ocr", "answer_nll"), ("reasoning", "answer_nll"))
REWARD_KEYS = ("reward/reasoning/accuracy", "reward/reasoning/format_think", "reward/grounding/iou",
               "reward/grounding/format_answer", "ntp_loss/ocr/ntp")


def collect(out: Path, methods: list[str], seeds: list[int], command: str) -> dict:
    warm_dir = out / "warmstart_run"
    warm_eval = _evals(read_metrics(warm_dir)).get(0, {})
    wall = lambda run: (json.loads((out / run / DONE_FILE).read_text())["wall_s"]  # noqa: E731
                        if (out / run / DONE_FILE).exists() else None)
    results = {
        "command": command,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"CPU, {os.cpu_count()} cores, shared with other jobs",
        "overrides": {"shared": SHARED, "ocr_first": OCR_FIRST, "warmstart": WARMSTART, "rl": RL,
                      "runs": RUNS},
        "warmstart": {"eval": {**teacher_forced_evals(warm_dir),
                               **{k: v for k, v in warm_eval.items() if k.startswith("eval/")}},
                      "wall_s": wall("warmstart_run"), "ocr_first_wall_s": wall("ocr_first_run")},
        "methods": {},
    }
    for method in methods:
        runs, finished, missing = [], [], []
        for seed in seeds:
            summary = summarise_run(out / method / f"seed_{seed}")
            (runs.append(summary), finished.append(seed)) if summary else missing.append(seed)
        results["methods"][method] = {"seeds": finished, "missing": missing, "runs": runs,
                                      "aggregate": aggregate(runs) if runs else None}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="workdirs go here (not the repo)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (or of any ablation row)")
    parser.add_argument("--ablations", default="",
                        help=f"also run these ablations' rows: comma-separated subset of "
                             f"{', '.join(ABLATIONS)}, or 'all'")
    parser.add_argument("--results-dir", type=Path, default=HERE,
                        help="where RESULTS.md and results.json go")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RUNS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(RUNS)}")
    ablations = list(ABLATIONS) if args.ablations == "all" else [
        a.strip() for a in args.ablations.split(",") if a.strip()]
    if any(a not in ABLATIONS for a in ablations):
        parser.error(f"--ablations: unknown {ablations}; known: {', '.join(ABLATIONS)}, all")
    methods += [label for a in ablations for label in ABLATIONS[a][1] if label not in methods]
    out = args.out.resolve()
    if REPO in out.parents or out == REPO:
        parser.error(f"--out {out} is inside the repository; use a path outside it (e.g. /tmp)")
    command = "python experiments/forgetting_in_miniature/run.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
    if not args.report_only:
        began = time.time()
        if not run_training("warm-start, stage 1 (OCR only)", out / "ocr_first_run",
                            ocr_first_overrides()):
            return 1
        if not run_training("warm-start", out / "warmstart_run", warmstart_overrides(out)):
            return 1
        measure_image_reliance("warm-start", out / "warmstart_run", warmstart_overrides(out))
        jobs = [(m, s) for s in seeds for m in methods]  # seed-major: every method gets seed 0 first
        for index, (method, seed) in enumerate(jobs, 1):
            elapsed = (time.time() - began) / 60
            print(f"--- [{index}/{len(jobs)}] {method} seed {seed} ({elapsed:.1f} min elapsed)",
                  flush=True)
            label, workdir = f"{method}/seed_{seed}", out / method / f"seed_{seed}"
            run_training(label, workdir, rl_overrides(out, method, seed))
            measure_image_reliance(label, workdir, rl_overrides(out, method, seed))
            try:  # the report after every run; a reporting bug must not stop the sweep
                write_results(collect(out, methods, seeds, command), args.results_dir)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    results = collect(out, methods, seeds, command)
    write_results(results, args.results_dir)
    print(f"wrote {args.results_dir / 'RESULTS.md'} and results.json", flush=True)
    return 0


NOTES_MARKER = "<!-- notes: everything below this line is hand-written; run.py keeps it -->"


def write_results(results: dict, directory: Path) -> None:
    """results.json and RESULTS.md; RESULTS.md's hand-written part (after NOTES_MARKER) is
    kept when the tables are regenerated."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    path = directory / "RESULTS.md"
    notes = ""
    if path.exists() and NOTES_MARKER in path.read_text():
        notes = path.read_text().split(NOTES_MARKER, 1)[1]
    path.write_text(render_markdown(results) + "\n" + NOTES_MARKER + (notes or "\n"))


if __name__ == "__main__":
    sys.exit(main())
