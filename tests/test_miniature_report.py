"""The miniature's report (experiments/forgetting_in_miniature/run.py) from hand-written
metrics files: the lambda range, the lambda-effect summary and an ablation table's row are
the numbers worked out here by hand; no training runs."""

import importlib.util
import json

import pytest

from tests.short_run import ROOT


@pytest.fixture(scope="module")
def runner():
    path = ROOT / "experiments" / "forgetting_in_miniature" / "run.py"
    spec = importlib.util.spec_from_file_location("miniature_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval(step, acc, iou, exact, reliance):
    return {"stage": "eval", "step": step, "eval/reasoning/accuracy": acc, "eval/grounding/iou": iou,
            "eval/ocr/ocr_exact": exact, "eval/grounding/image_reliance": 0.1,
            "eval/ocr/image_reliance": reliance}


def _rl(step, source, weights, **extra):
    line = {"stage": "rl", "step": step, "source": source, "completion_length_mean": 6.0,
            "grad_norm": 0.0 if step == 1 else 0.3,
            **{f"weight/{k}": v for k, v in weights.items()}, **extra}
    if source == "ocr":
        line["ntp_loss/ocr/ntp"] = 0.1
    else:
        line[f"reward/{source}/r"] = 0.5
    return line


def _write(workdir, lines, overrides=None):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (workdir / "DONE.json").write_text(json.dumps({"overrides": overrides or {}, "wall_s": 60.0}))


def test_ablation_rows_report_lambda_range_and_effect(tmp_path, runner):
    _write(tmp_path / "warmstart_run", [_eval(0, 0.40, 0.24, 1.0, 14.0)])
    weights = [  # (reasoning, ocr) lambda per step
        {"reasoning/r": 1.0, "ocr/ntp": 1.0}, {"reasoning/r": 0.8, "ocr/ntp": 1.5},
        {"reasoning/r": 0.6, "ocr/ntp": 2.5}]
    for seed, (cos, change) in enumerate([(0.9, 0.2), (0.7, 1.0)]):
        lines = [_eval(0, 0.40, 0.24, 1.0, 14.0),
                 _rl(1, "reasoning", weights[0], lambda_gradient_cosine=1.0, advantage_change=0.0),
                 _rl(2, "ocr", weights[1], lambda_gradient_cosine=0.1, advantage_change=9.0),
                 _rl(3, "reasoning", weights[2], lambda_gradient_cosine=cos, advantage_change=change),
                 _eval(3, 0.42 + 0.02 * seed, 0.20, 1.0, 13.0)]
        _write(tmp_path / "recap_T1" / f"seed_{seed}", lines)
    summary = runner.summarise_run(tmp_path / "recap_T1" / "seed_0")
    assert summary["lambda_range"] == {"reasoning/r": {"min": 0.6, "max": 1.0},
                                       "ocr/ntp": {"min": 1.0, "max": 2.5}}
    assert summary["lambda_span"] == {"min": 0.6, "max": 2.5}
    # the OCR (SFT) step is left out: lambda only scales its loss
    assert summary["lambda_effect"]["lambda_gradient_cosine"] == {"mean": pytest.approx(0.95),
                                                                  "extreme": 0.9}
    assert summary["lambda_effect"]["advantage_change"] == {"mean": pytest.approx(0.1), "extreme": 0.2}
    assert summary["lambda_effect"]["no_gradient_fraction"] == 0.5  # step 1's grad_norm is 0

    results = runner.collect(tmp_path, ["recap_T1"], [0, 1], "test")
    table = runner.render_markdown(results)
    row = next(line for line in table.splitlines() if line.startswith("| 1 (`recap_T1`)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # reasoning acc: seeds 0.42, 0.44 -> mean 0.43, sample std 0.0141; change +0.030 from 0.40
    assert cells[1] == "0,1"
    assert cells[2] == "0.430 ± 0.014 (+0.030)"
    assert cells[4] == "1.000 ± 0.000 (+0.000)"
    assert cells[7] == "0.600 – 2.500"
    # cosine: per-seed means 0.95 and 0.85 -> 0.9000, lowest 0.9 and 0.7 -> 0.800
    assert cells[8] == "0.9000 (0.800)"
    # advantage change: per-seed means 0.1 and 0.5 -> 0.300, highest 0.2 and 1.0 -> 0.600
    assert cells[9] == "0.300 (0.600)"
    assert cells[10] == "0.50"
    assert "| recap_T1 | `rl.method=recap`, `recap.variant=released`" in table
