"""recap_jax.analysis against hand-built metrics files, and colabs/analysis.ipynb run headless.

The workdir fixture `analysis_workdir` writes a small metrics.jsonl + config.json following
the train.py contract (see recap_jax/analysis.py); it can be swapped for the workdir of a
real short training run: the notebook test derives what it expects from the files.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from recap_jax import analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colabs" / "analysis.ipynb"

OBJECTIVES = ["reasoning/accuracy", "reasoning/format_think", "grounding/iou",
              "grounding/format_answer", "ocr/ntp"]
SOURCE_OBJECTIVES = {"reasoning": OBJECTIVES[:2], "grounding": OBJECTIVES[2:4],
                     "ocr": OBJECTIVES[4:]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def dumps(**row):
    return json.dumps(row)


def eval_line(step, **values):
    return dumps(stage="eval", step=step, time=1000.0 + step,
                 **{f"eval/{k.replace('__', '/')}": v for k, v in values.items()})


# ------------------------------------------------------------------------ fixture workdir

@pytest.fixture
def analysis_workdir(tmp_path):
    """A workdir as `python -m recap_jax.train --workdir DIR` leaves it: 3 SFT steps, an eval
    at RL step 0, 9 RL steps over three round-robin sources (RECAP weights), evals at RL steps
    3 and 9."""
    rows = []
    for step in range(1, 4):
        rows.append(dict(stage="sft", step=step, time=100.0 + step, loss=2.0 / step,
                         grad_norm=1.5, tokens_per_s=900.0, source="ocr",
                         **{"ntp_loss/ocr/ntp": 2.0 / step},
                         **{f"weight/{k}": 1.0 for k in OBJECTIVES}))
    rows.append(dict(stage="eval", step=0, time=200.0, **{
        "eval/reasoning/accuracy": 0.25, "eval/reasoning/completion_length": 80.0,
        "eval/grounding/iou": 0.60, "eval/grounding/iou_thresholded": 0.55,
        "eval/grounding/completion_length": 20.0, "eval/grounding/num_examples": 8,
        "eval/ocr/ocr_char_f1": 0.70,
        "eval/ocr/ocr_exact": 0.40, "eval/ocr/completion_length": 12.0}))
    sources = ["reasoning", "grounding", "ocr"]
    for step in range(1, 10):
        source = sources[(step - 1) % 3]
        row = dict(stage="rl", step=step, time=300.0 + step, loss=0.1 * step,
                   grad_norm=0.5, tokens_per_s=400.0, completion_length_mean=60.0 - step,
                   source=source)
        for k in SOURCE_OBJECTIVES[source]:
            if k == "ocr/ntp":
                row[f"ntp_loss/{k}"] = 1.0 - 0.05 * step
            else:
                row[f"reward/{k}"] = min(1.0, 0.1 * step + 0.01 * len(k))
        for n, k in enumerate(OBJECTIVES):
            row[f"weight/{k}"] = 1.0 + 0.01 * (n - 2) * step
            row[f"recap/c/{k}"] = 1.0 + 0.02 * (n - 2)
            row[f"recap/i/{k}"] = 0.05 * n
        rows.append(row)
        if step in (3, 9):
            rows.append(dict(stage="eval", step=step, time=400.0 + step, **{
                "eval/reasoning/accuracy": 0.25 + 0.03 * step,
                "eval/reasoning/completion_length": 80.0 - step,
                "eval/grounding/iou": 0.60 - 0.01 * step,
                "eval/grounding/iou_thresholded": 0.55 - 0.01 * step,
                "eval/grounding/completion_length": 20.0, "eval/grounding/num_examples": 8,
                "eval/ocr/ocr_char_f1": 0.70 + 0.001 * step, "eval/ocr/ocr_exact": 0.40,
                "eval/ocr/completion_length": 12.0}))
    write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) for r in rows])
    config = {"rl": {"method": "recap", "steps": 9}, "sft": {"steps": 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# ------------------------------------------------------------------------ load_metrics

def test_malformed_lines_are_skipped_counted_and_reported(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", [
        dumps(stage="rl", step=1, time=1.0, loss=0.5),              # 1 ok
        '{"stage": "rl", "step": 2, "loss": ',                        # 2 invalid JSON
        dumps(stage="rl", step=2, time=2.0, loss=0.4),              # 3 ok
        "[1, 2, 3]",                                                  # 4 not an object
        dumps(step=3, loss=0.3),                                      # 5 no stage
        dumps(stage="rl", step="3", loss=0.3),                        # 6 step not an int
        "",                                                           # 7 blank: ignored
        dumps(stage="rl", step=-1, loss=0.3),                         # 8 negative step
        dumps(stage="eval", step=0, time=3.0, **{"eval/ocr/ocr_exact": 0.5}),  # 9 ok
        '{"stage": "rl", "step": 3, "lo',                             # 10 cut short
    ])
    with pytest.warns(UserWarning, match=r"skipped 6 malformed line\(s\)") as record:
        metrics = analysis.load_metrics(tmp_path)
    assert [n for n, _ in metrics.skipped] == [2, 4, 5, 6, 8, 10]
    assert "invalid JSON" in dict(metrics.skipped)[2]
    message = str(record[0].message)
    assert str(path) in message and "line 2" in message and "line 10" in message
    assert [r["step"] for r in metrics["rl"]] == [1, 2]
    assert [r["loss"] for r in metrics["rl"]] == [0.5, 0.4]
    assert metrics["eval"][0]["eval/ocr/ocr_exact"] == 0.5
    assert metrics.duplicates == 0


def test_duplicate_stage_step_keeps_last_line(tmp_path):
    # a resumed run re-logged RL steps 2 and 3; SFT step 2 is a different key
    write_lines(tmp_path / "metrics.jsonl", [
        dumps(stage="sft", step=2, time=0.5, loss=9.0),
        dumps(stage="rl", step=1, time=1.0, loss=1.0),
        dumps(stage="rl", step=2, time=2.0, loss=2.0),
        dumps(stage="rl", step=3, time=3.0, loss=3.0),
        dumps(stage="rl", step=2, time=4.0, loss=20.0),
        dumps(stage="rl", step=3, time=5.0, loss=30.0),
        dumps(stage="rl", step=4, time=6.0, loss=40.0),
    ])
    metrics = analysis.load_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in metrics["rl"]] == [(1, 1.0), (2, 20.0), (3, 30.0),
                                                               (4, 40.0)]
    assert [(r["step"], r["loss"]) for r in metrics["sft"]] == [(2, 9.0)]
    assert metrics.duplicates == 2
    assert metrics.skipped == []


def test_rows_are_sorted_by_step_within_a_stage_and_stages_keep_file_order(tmp_path):
    write_lines(tmp_path / "metrics.jsonl",
                [dumps(stage="sft", step=4, loss=1.0), dumps(stage="eval", step=0)]
                + [dumps(stage="rl", step=s, loss=float(s)) for s in (3, 1, 2)])
    metrics = analysis.load_metrics(tmp_path)
    assert list(metrics) == ["sft", "eval", "rl"]
    assert [r["step"] for r in metrics["rl"]] == [1, 2, 3]


def test_missing_metrics_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        analysis.load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        analysis.load_config(tmp_path)


def test_load_metrics_accepts_the_file_itself(tmp_path):
    path = write_lines(tmp_path / "other.jsonl", [dumps(stage="sft", step=1, loss=1.0)])
    assert analysis.load_metrics(path)["sft"][0]["loss"] == 1.0


def test_load_config_reads_the_rl_method(analysis_workdir):
    assert analysis.load_config(analysis_workdir)["rl"]["method"] == "recap"


# ------------------------------------------------------------------------ series, objectives

def test_series_keeps_rows_with_the_key_in_order():
    rows = [{"step": 1, "reward/a": 0.5}, {"step": 2, "loss": 1.0},
            {"step": 3, "reward/a": 1}, {"step": 4, "reward/a": None}]
    steps, values = analysis.series(rows, "reward/a")
    np.testing.assert_array_equal(steps, [1, 3, 4])
    np.testing.assert_array_equal(values[:2], [0.5, 1.0])
    assert math.isnan(values[2])
    steps, values = analysis.series(rows, "reward/missing")
    assert steps.size == 0 and values.size == 0


def test_series_reads_non_finite_values_written_as_strings():
    # JSON has no nan / inf: recap_jax.metrics_log writes them as str(float)
    rows = [{"step": 1, "recap/c/a": "nan"}, {"step": 2, "recap/c/a": "inf"},
            {"step": 3, "recap/c/a": "-inf"}, {"step": 4, "recap/c/a": 1.25}]
    _, values = analysis.series(rows, "recap/c/a")
    assert math.isnan(values[0]) and values[1] == math.inf and values[2] == -math.inf
    assert values[3] == 1.25


def test_series_rejects_non_numbers_naming_key_and_step():
    with pytest.raises(ValueError, match=r"'source' at stage 'rl' step 7"):
        analysis.series([{"stage": "rl", "step": 7, "source": "ocr"}], "source")


def test_objectives_in_first_seen_order_with_slashes_in_names():
    rows = [{"step": 1, "loss": 1.0, "source": "ocr", "ntp_loss/ocr/ntp": 2.0,
             "recap/c/ocr/ntp": 1.0},
            {"step": 2, "recap/i/grounding/iou": 0.1, "reward/reasoning/accuracy": 0.5,
             "weight/reasoning/format_think": 1.0, "eval/grounding/iou": 0.3}]
    assert analysis.objectives(rows) == ["ocr/ntp", "grounding/iou", "reasoning/accuracy",
                                         "reasoning/format_think"]


def test_objectives_of_the_fixture_run(analysis_workdir):
    metrics = analysis.load_metrics(analysis_workdir)
    assert sorted(analysis.objectives(metrics["rl"])) == sorted(OBJECTIVES)


# ------------------------------------------------------------------------ eval_table

def test_eval_table_before_is_step_0_after_is_last_step(analysis_workdir):
    table = analysis.eval_table(analysis.load_metrics(analysis_workdir)["eval"])
    assert set(table) == {"reasoning", "grounding", "ocr"}
    assert set(table["grounding"]) == {"iou", "iou_thresholded", "completion_length",
                                       "num_examples"}
    # the fixture's RL step-9 eval: 0.25 + 0.27, 0.60 - 0.09, 80 - 9, 0.70 + 0.009
    assert table["reasoning"]["accuracy"] == pytest.approx({"before": 0.25, "after": 0.52})
    assert table["grounding"]["iou"] == pytest.approx({"before": 0.60, "after": 0.51})
    assert table["reasoning"]["completion_length"] == pytest.approx({"before": 80.0,
                                                                     "after": 71.0})
    assert table["ocr"]["ocr_char_f1"] == pytest.approx({"before": 0.70, "after": 0.709})


def test_eval_table_missing_before_or_after_is_none():
    rows = [{"stage": "eval", "step": 5, "eval/ocr/ocr_exact": 0.3},
            {"stage": "eval", "step": 0, "eval/reasoning/accuracy": 0.1},
            {"stage": "eval", "step": 2, "eval/ocr/ocr_exact": 0.2, "time": 1.0}]
    table = analysis.eval_table(rows)
    assert table == {"ocr": {"ocr_exact": {"before": None, "after": 0.3}},
                     "reasoning": {"accuracy": {"before": 0.1, "after": None}}}
    with pytest.raises(ValueError, match=r"'eval/ocr/ocr_exact' at step 3"):
        analysis.eval_table([{"stage": "eval", "step": 3, "eval/ocr/ocr_exact": "high"}])


def test_format_eval_table_lists_every_metric_with_its_change():
    table = {"grounding": {"iou": {"before": 0.6, "after": 0.5}},
             "ocr": {"ocr_exact": {"before": None, "after": 0.25}}}
    lines = analysis.format_eval_table(table).splitlines()
    assert lines[0].split() == ["task", "metric", "before", "after", "change"]
    task, metric, before, after, change = lines[1].split()
    assert (task, metric) == ("grounding", "iou")
    assert (float(before), float(after), float(change)) == pytest.approx((0.6, 0.5, -0.1))
    assert lines[2].split() == ["ocr", "ocr_exact", "-", "0.2500", "-"]


# ------------------------------------------------------------------------ smooth

def test_smooth_by_hand():
    np.testing.assert_allclose(analysis.smooth([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(analysis.smooth([3, 0, 6, 3], 3), [3, 1.5, 3, 3])
    np.testing.assert_allclose(analysis.smooth([4, 8], 10), [4, 6])
    np.testing.assert_array_equal(analysis.smooth([0.1, 0.7, 0.3], 1), [0.1, 0.7, 0.3])
    assert analysis.smooth([], 3).shape == (0,)


def test_smooth_nan_spoils_only_its_windows():
    out = analysis.smooth([1.0, float("nan"), 3.0, 5.0, 7.0], 2)
    assert np.isnan(out[1:3]).all()
    np.testing.assert_allclose(out[[0, 3, 4]], [1.0, 4.0, 6.0])


def test_smooth_full_windows_match_a_convolution():
    x = np.random.default_rng(0).normal(size=40)
    expected = np.convolve(x, np.ones(7) / 7, mode="valid")
    np.testing.assert_allclose(analysis.smooth(x, 7)[6:], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_smooth_rejects_bad_windows(window):
    with pytest.raises(ValueError, match="window"):
        analysis.smooth([1.0, 2.0], window)


# ------------------------------------------------------------------------ plots

def lines_by_label(ax):
    return {line.get_label(): line for line in ax.lines}


def test_plot_rewards_one_panel_per_objective_with_the_logged_values(analysis_workdir):
    rl = analysis.load_metrics(analysis_workdir)["rl"]
    fig = analysis.plot_rewards(rl)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert set(panels) == set(OBJECTIVES)
    # grounding is every third RL step from step 2: rewards 0.1 * step + 0.01 * len("grounding/iou")
    line = lines_by_label(panels["grounding/iou"])["reward/grounding/iou"]
    np.testing.assert_array_equal(line.get_xdata(), [2, 5, 8])
    np.testing.assert_allclose(line.get_ydata(), [0.33, 0.63, 0.93])
    line = lines_by_label(panels["ocr/ntp"])["ntp_loss/ocr/ntp"]
    np.testing.assert_allclose(line.get_ydata(), [1 - 0.15, 1 - 0.30, 1 - 0.45])
    assert "lower is better" in panels["ocr/ntp"].get_ylabel()


def test_plot_rewards_draws_the_moving_average(analysis_workdir):
    rl = analysis.load_metrics(analysis_workdir)["rl"]
    fig = analysis.plot_rewards(rl, window=2)
    ax = next(ax for ax in fig.axes if ax.get_title() == "grounding/iou")
    np.testing.assert_allclose(lines_by_label(ax)["reward/grounding/iou"].get_ydata(),
                               [0.33, 0.48, 0.78])


def test_plot_weights_and_recap_signals_show_lambda_c_and_i(analysis_workdir):
    rl = analysis.load_metrics(analysis_workdir)["rl"]
    (ax,) = analysis.plot_weights(rl).axes
    weights = lines_by_label(ax)
    assert set(OBJECTIVES) <= set(weights)
    np.testing.assert_allclose(weights["ocr/ntp"].get_ydata(), 1 + 0.02 * np.arange(1, 10))
    c_ax, i_ax = analysis.plot_recap_signals(rl).axes
    np.testing.assert_allclose(lines_by_label(c_ax)["reasoning/accuracy"].get_ydata(),
                               np.full(9, 0.96))
    np.testing.assert_allclose(lines_by_label(i_ax)["ocr/ntp"].get_ydata(), np.full(9, 0.2))


def test_plot_recap_signals_of_a_static_run_says_so(tmp_path):
    write_lines(tmp_path / "metrics.jsonl",
                [dumps(stage="rl", step=s, **{"weight/a/b": 1.0, "reward/a/b": 0.5})
                 for s in (1, 2)])
    fig = analysis.plot_recap_signals(analysis.load_metrics(tmp_path)["rl"])
    assert "did not use RECAP" in fig.axes[0].texts[0].get_text()


def test_plot_eval_before_after_bar_heights(analysis_workdir):
    table = analysis.eval_table(analysis.load_metrics(analysis_workdir)["eval"])
    fig = analysis.plot_eval_before_after(table)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"reasoning", "grounding", "ocr"}
    ax = panels["grounding"]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["iou", "iou_thresholded"]  # completion_length, num_examples left out
    before, after = ax.containers
    np.testing.assert_allclose([b.get_height() for b in before], [0.60, 0.55])
    np.testing.assert_allclose([b.get_height() for b in after], [0.51, 0.46])


# ------------------------------------------------------------------------ the notebook

def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "RECAP_WORKDIR" in code[0].source and "WORKDIR =" in code[0].source


def expected_eval_tasks(workdir):
    """Task names of the workdir's eval lines, read here without recap_jax.analysis."""
    tasks = set()
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "eval":
            tasks |= {k.split("/")[1] for k in row if k.startswith("eval/")}
    return tasks


def test_notebook_runs_headless_on_a_workdir(analysis_workdir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("RECAP_WORKDIR", str(analysis_workdir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(analysis_workdir)}})
    client.execute()  # raises CellExecutionError if any cell errors

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4  # rewards, weights lambda, c and i, eval before/after
    printed = "".join(o.text for o in outputs if o.output_type == "stream"
                      and o.name == "stdout")
    assert str(analysis_workdir) in printed
    table_lines = [line.split() for line in printed.splitlines()]
    tasks = expected_eval_tasks(analysis_workdir)
    assert tasks and all(any(cols[:1] == [t] for cols in table_lines) for t in tasks)
    assert ["task", "metric", "before", "after", "change"] in table_lines
