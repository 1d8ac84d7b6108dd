"""Read and plot a training workdir's metrics (what colabs/analysis.ipynb uses).

`python -m recap_jax.train --config … --workdir DIR` writes

    DIR/metrics.jsonl   one JSON object per line, with "stage" ("sft", "rl" or "eval"),
                        "step" (1-based within the stage; an eval line carries the RL step it
                        was taken at, 0 = before RL, i.e. the warm-start) and "time".
                        Train lines ("sft", "rl"): "loss", "grad_norm", "tokens_per_s",
                        "completion_length_mean", "source", and per objective k
                        (names like "reasoning/accuracy", "ocr/ntp"):
                          reward/<k>     batch-mean raw reward (RL objectives in the batch)
                          ntp_loss/<k>   batch-mean NTP loss (SFT objectives in the batch)
                          weight/<k>     lambda_k used in that step (recap/weight/<k>,
                                         recap.ObjectiveSet.metrics' name, is read too)
                          recap/c/<k>    convergence rate c_k after the step (RECAP runs)
                          recap/i/<k>    instability i_k after the step (RECAP runs)
                        Eval lines: "eval/<task>/<metric>" floats.
                        Non-finite values may be logged as the strings "nan", "inf".
    DIR/config.json     the resolved run config.

Reading (no pandas: plain python and numpy)
    metrics = load_metrics(DIR)          # {"sft": [row, …], "rl": […], "eval": […]}
    metrics.skipped                      # [(line number, reason), …] of malformed lines
    steps, values = series(metrics["rl"], "reward/reasoning/accuracy")
    objectives(metrics["rl"])            # ["reasoning/accuracy", …] in first-seen order
    eval_table(metrics["eval"])          # {task: {metric: {"before": v0, "after": v_last}}}

Plotting (matplotlib is imported lazily, only the plotting functions need it); each returns
a `matplotlib.figure.Figure` built without pyplot, so a notebook shows it exactly once when
it is a cell's last expression: plot_rewards, plot_weights, plot_recap_signals,
plot_eval_before_after.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

# Per-objective key prefixes, longest first so "recap/c/x" is not read as objective "c/x".
OBJECTIVE_PREFIXES = ("recap/weight/", "recap/c/", "recap/i/", "recap/s/",
                      "reward/", "ntp_loss/", "weight/")
# Eval metrics that are not [0, 1] scores (tokens, counts): left out of the before/after
# bars and of "forgetting"; the printed table keeps them.
NON_SCORE_METRICS = ("completion_length", "num_examples")

Row = dict[str, Any]
# How a writer without JSON nan / inf spells them (recap_jax.metrics_log writes str(float)).
NON_FINITE_STRINGS = frozenset({"nan", "inf", "-inf", "NaN", "Infinity", "-Infinity"})


class MetricsLog(dict):
    """`{stage: [row, …]}` with rows sorted by step, one per (stage, step).

    Attributes: `path` (the file read), `skipped` ([(1-based line number, reason)] for every
    malformed line), `duplicates` (lines replaced by a later line with the same (stage, step),
    as after a resumed run).
    """

    def __init__(self, rows_by_stage, path, skipped, duplicates):
        super().__init__(rows_by_stage)
        self.path = path
        self.skipped = skipped
        self.duplicates = duplicates


def _metrics_path(workdir) -> pathlib.Path:
    path = pathlib.Path(workdir)
    return path if path.is_file() else path / METRICS_FILE


def _row_problem(row) -> str | None:
    """Why a parsed line is not a metrics row, or None if it is one."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    if not isinstance(row.get("stage"), str):
        return "no string 'stage'"
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' is not an int >= 0 ({step!r})"
    return None


def load_metrics(workdir) -> MetricsLog:
    """Read `workdir/metrics.jsonl` (or a metrics file given directly) into rows per stage.

    Malformed lines (invalid JSON, e.g. a line cut short by a crash; not an object; no string
    "stage"; no int "step" >= 0) are skipped, counted in `.skipped` with their line numbers,
    and reported in one warning. Blank lines are ignored. For a (stage, step) seen twice the
    last line wins. Raises FileNotFoundError naming the file if it does not exist.
    """
    path = _metrics_path(workdir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: expected the --workdir of "
                                f"`python -m recap_jax.train`, which writes {METRICS_FILE}")
    by_key: dict[tuple[str, int], Row] = {}
    stage_order: dict[str, None] = {}  # stages in the order the file first names them
    skipped: list[tuple[int, str]] = []
    duplicates = 0
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append((line_number, f"invalid JSON ({e.msg})"))
                continue
            problem = _row_problem(row)
            if problem:
                skipped.append((line_number, problem))
                continue
            key = (row["stage"], row["step"])
            duplicates += key in by_key
            by_key[key] = row
            stage_order.setdefault(row["stage"], None)
    if skipped:
        listed = ", ".join(f"line {n} ({why})" for n, why in skipped[:10])
        more = f", and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"{path}: skipped {len(skipped)} malformed line(s): {listed}{more}",
                      stacklevel=2)
    rows_by_stage: dict[str, list[Row]] = {stage: [] for stage in stage_order}
    for (stage, _), row in sorted(by_key.items(), key=lambda item: item[0][1]):
        rows_by_stage[stage].append(row)
    return MetricsLog(rows_by_stage, path, skipped, duplicates)


def load_config(workdir) -> dict:
    """The resolved run config, `workdir/config.json`, as a nested dict."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _as_number(value, what: str) -> float:
    """A logged scalar as float: null -> nan, "nan" / "inf" / "-inf" -> the float, else
    a ValueError naming `what`."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value in NON_FINITE_STRINGS:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number: {value!r}")
    return float(value)


def series(rows: Iterable[Row], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that carry `key`, in row order.

    Rows without the key are left out (an objective absent from a step's batch has no
    reward that step). A JSON null becomes nan, the strings "nan" / "inf" / "-inf" their
    float; any other non-numeric value raises ValueError.
    """
    steps, values = [], []
    for row in rows:
        if key not in row:
            continue
        what = f"metric {key!r} at stage {row.get('stage')!r} step {row.get('step')}"
        values.append(_as_number(row[key], what))
        steps.append(row["step"])
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def objectives(rows: Iterable[Row]) -> list[str]:
    """Objective names found in per-objective keys (reward/, ntp_loss/, weight/, recap/c/,
    recap/i/, …), in the order they first appear."""
    found: dict[str, None] = {}
    for row in rows:
        for key in row:
            for prefix in OBJECTIVE_PREFIXES:
                if key.startswith(prefix) and len(key) > len(prefix):
                    found.setdefault(key[len(prefix):], None)
                    break
    return list(found)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: out[t] = mean(values[max(0, t - window + 1) : t + 1]).

    Same length as `values`; the first window - 1 points average what is there so far.
    window = 1 returns the values unchanged.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"smoothing window must be an int >= 1, got {window!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"smooth expects a 1-D sequence, got shape {x.shape}")
    if x.size == 0:
        return x
    # Windowed sums by convolution, not cumsum differences: exact for window 1, and a nan
    # spoils only the windows that contain it.
    window_sums = np.convolve(x, np.ones(window))[: len(x)]
    return window_sums / np.minimum(np.arange(1, len(x) + 1), window)


def eval_table(rows: Iterable[Row]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{task: {metric: {"before": v0, "after": v_last}}} from eval rows ("eval/<task>/<metric>").

    "before" is the value at step 0 (the warm-start, before RL); "after" the value at the
    last eval step > 0. Either is None when there is no such eval line with that metric.
    """
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        for key, value in row.items():
            parts = key.split("/", 2)
            if len(parts) != 3 or parts[0] != "eval" or not parts[1] or not parts[2]:
                continue
            _, task, metric = parts
            number = _as_number(value, f"eval metric {key!r} at step {row['step']}")
            cell = table.setdefault(task, {}).setdefault(metric, {"before": None, "after": None})
            cell["before" if row["step"] == 0 else "after"] = number
    return table


def format_eval_table(table: dict) -> str:
    """A fixed-width text table of `eval_table` output: task, metric, before, after, change."""
    def number(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'task':<12} {'metric':<22} {'before':>10} {'after':>10} {'change':>10}"]
    for task, metrics in table.items():
        for metric, cell in metrics.items():
            before, after = cell["before"], cell["after"]
            change = "-" if before is None or after is None else f"{after - before:+.4f}"
            lines.append(f"{task:<12} {metric:<22} {number(before):>10} {number(after):>10} "
                         f"{change:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plotting

def _figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.2):
    """A Figure and its axes (2-D array), not registered with pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _empty_figure(message: str):
    fig, axes = _figure()
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _plot_series(ax, steps, values, window: int, label: str, color=None):
    """Raw values (faint when smoothed) and their moving average; the smoothed line is the
    one labelled, for the legend."""
    if window > 1:
        raw, = ax.plot(steps, values, color=color, alpha=0.3, linewidth=1,
                       label=f"_raw {label}")
        ax.plot(steps, smooth(values, window), color=raw.get_color(), label=label)
    else:
        ax.plot(steps, values, color=color, marker="." if len(steps) < 50 else None,
                label=label)


def _present_key(rows: Sequence[Row], *keys: str) -> str | None:
    """The first of `keys` that some row carries."""
    return next((k for k in keys if any(k in row for row in rows)), None)


def plot_rewards(rows: Sequence[Row], window: int = 1):
    """One panel per objective: its RECAP signal over steps, the batch-mean raw reward
    (reward/<k>, higher is better) or for SFT objectives the NTP loss (ntp_loss/<k>, lower
    is better), with a `window`-step moving average when window > 1."""
    names = [n for n in objectives(rows)
             if _present_key(rows, f"reward/{n}", f"ntp_loss/{n}")]
    if not names:
        return _empty_figure("no reward/ or ntp_loss/ metrics in these rows")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.5)
    for ax, name in zip(axes.flat, names):
        key = _present_key(rows, f"reward/{name}", f"ntp_loss/{name}")
        _plot_series(ax, *series(rows, key), window, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("reward (higher is better)" if key.startswith("reward/")
                      else "NTP loss (lower is better)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    return fig


def plot_weights(rows: Sequence[Row], window: int = 1):
    """The weights lambda_k used at each step, one line per objective; lambda = 1 for all
    objectives is plain (unweighted) training."""
    lines = [(n, _present_key(rows, f"weight/{n}", f"recap/weight/{n}"))
             for n in objectives(rows)]
    lines = [(n, key) for n, key in lines if key]
    if not lines:
        return _empty_figure("no weight/ metrics in these rows")
    fig, axes = _figure(width=7.0, height=3.8)
    ax = axes[0, 0]
    for name, key in lines:
        _plot_series(ax, *series(rows, key), window, label=name)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="_lambda = 1")
    ax.set_title("objective weights $\\lambda_k$")
    ax.set_xlabel("step")
    ax.set_ylabel("$\\lambda$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_recap_signals(rows: Sequence[Row], window: int = 1):
    """Two panels: convergence rate c_k (recap/c/<k>; > 1 = the objective got worse over
    the last window, < 1 = improving) and instability i_k (recap/i/<k>, coefficient of
    variation of the recent signals). Static-weight runs log neither: the figure says so."""
    names = [n for n in objectives(rows)
             if _present_key(rows, f"recap/c/{n}", f"recap/i/{n}")]
    if not names:
        return _empty_figure("no recap/c/ or recap/i/ metrics: this run did not use RECAP "
                             "(static weights)")
    fig, axes = _figure(1, 2, width=5.5, height=3.8)
    for ax, (symbol, title) in zip(axes.flat, [("c", "convergence rate $c_k$"),
                                                ("i", "instability $i_k$")]):
        for name in names:
            key = f"recap/{symbol}/{name}"
            if _present_key(rows, key):
                _plot_series(ax, *series(rows, key), window, label=name)
        if symbol == "c":
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="_c = 1")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_eval_before_after(table: dict, exclude: Sequence[str] = NON_SCORE_METRICS):
    """One panel per task: a pair of bars per metric, before RL (step 0) and after (last
    eval). Metrics in `exclude` (completion length, example count: other scales) are left
    out; a missing value is drawn as no bar."""
    tasks = {t: [m for m in metrics if m not in exclude] for t, metrics in table.items()}
    tasks = {t: ms for t, ms in tasks.items() if ms}
    if not tasks:
        return _empty_figure("no eval/<task>/<metric> lines to compare")
    fig, axes = _figure(1, len(tasks), width=max(3.0, 1.6 * max(map(len, tasks.values()))))
    bar = 0.38
    for ax, (task, metrics) in zip(axes.flat, tasks.items()):
        x = np.arange(len(metrics))
        for offset, when, color in [(-bar / 2, "before", "tab:gray"),
                                    (bar / 2, "after", "tab:blue")]:
            heights = [np.nan if table[task][m][when] is None else table[task][m][when]
                       for m in metrics]
            bars = ax.bar(x + offset, heights, bar, label=when, color=color)
            ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
        ax.set_xticks(x, metrics, rotation=20, ha="right")
        ax.set_xlim(-0.8, len(metrics) - 0.2)
        ax.margins(y=0.12)
        ax.set_title(task)
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", ncols=2,
               fontsize="small")
    return fig
