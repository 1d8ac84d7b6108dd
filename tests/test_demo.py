"""The main job's pieces (recap_jax.demo), without running it: the warm-start's checksum check,
the comparison table and verdict from given metrics, and the plot file."""

import hashlib
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from recap_jax import demo, demo_settings

CONFIG_BYTES = b'{"model_type": "qwen2_5_vl"}'


def _warmstart(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir()
    (directory / "config.json").write_bytes(CONFIG_BYTES)
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    demo.write_manifest(directory)
    return directory


def test_manifest_is_sha256sum_format(tmp_path):
    directory = _warmstart(tmp_path / "ws")
    lines = (directory / demo_settings.MANIFEST_NAME).read_text().splitlines()
    expected = hashlib.sha256(bytes(range(256)) * 4).hexdigest()
    assert lines == [f"{hashlib.sha256(CONFIG_BYTES).hexdigest()}  config.json",
                     f"{expected}  model.safetensors"]
    assert demo.verify_manifest(directory) == ["config.json", "model.safetensors"]


def test_a_corrupt_file_is_refused_by_name(tmp_path):
    directory = _warmstart(tmp_path / "ws")
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[100] ^= 1  # one bit
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(demo.WarmStartCorrupt, match=r"model\.safetensors: sha256 [0-9a-f]{64}"):
        demo.verify_manifest(directory)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), r"config\.json: listed in SHA256SUMS but missing"),
    (lambda d: (d / "extra.safetensors").write_bytes(b"x"), r"extra\.safetensors not listed"),
    (lambda d: (d / demo_settings.MANIFEST_NAME).unlink(), r"SHA256SUMS: the warm-start's manifest"),
    (lambda d: (d / demo_settings.MANIFEST_NAME).write_text("abc config.json\n"), r"line 1"),
])
def test_missing_unlisted_or_malformed_is_refused(tmp_path, damage, message):
    directory = _warmstart(tmp_path / "ws")
    damage(directory)
    with pytest.raises(demo.WarmStartCorrupt, match=message):
        demo.verify_manifest(directory)


def test_stored_warmstart_matches_its_manifest():
    if not demo_settings.WARMSTART_DIR.exists():
        pytest.skip("no stored warm-start in this checkout")
    names = demo.verify_manifest(demo_settings.WARMSTART_DIR)
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)


BEFORE = {"stage": "eval", "step": 0, "eval/reasoning/accuracy": 0.4, "eval/grounding/iou": 0.2,
          "eval/ocr/ocr_exact": 1.0, "eval/ocr/ocr_char_f1": 1.0,
          "eval/grounding/image_reliance": 0.05, "eval/ocr/image_reliance": 15.5,
          "eval/reasoning/image_reliance": 0.05}
AFTER = {
    "reasoning_only": dict(BEFORE, **{"eval/reasoning/accuracy": 0.45, "eval/grounding/iou": 0.1,
                                      "eval/ocr/ocr_exact": 0.9, "eval/ocr/ocr_char_f1": 0.98,
                                      "eval/ocr/image_reliance": 15.0}),
    "recap": dict(BEFORE, **{"eval/reasoning/accuracy": 0.41, "eval/grounding/iou": 0.19,
                             "eval/ocr/image_reliance": 15.6}),
}


def test_comparison_rows_and_changes():
    rows = {(r["task"], r["metric"]): r for r in demo.comparison(BEFORE, AFTER)}
    assert len(rows) == len(demo.TABLE_METRICS)
    iou = rows[("grounding", "iou")]
    assert iou["before"] == 0.2 and iou["after"] == {"reasoning_only": 0.1, "recap": 0.19}
    assert iou["change"]["reasoning_only"] == pytest.approx(-0.1)
    assert iou["change"]["recap"] == pytest.approx(-0.01)
    assert rows[("ocr", "image_reliance")]["change"]["reasoning_only"] == pytest.approx(-0.5)


def test_comparison_skips_metrics_the_evaluation_lacks():
    before = {k: v for k, v in BEFORE.items() if "image_reliance" not in k}
    rows = demo.comparison(before, AFTER)
    assert [r["metric"] for r in rows] == ["accuracy", "iou", "ocr_exact", "ocr_char_f1"]


def test_table_formatting():
    table = demo.format_table(demo.comparison(BEFORE, AFTER), ["reasoning_only", "recap"])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "warm-start", "reasoning_only", "(change)", "recap",
                                "(change)"]
    assert lines[3].split() == ["grounding", "IoU", "0.200", "0.100", "(-0.100)", "0.190",
                                "(-0.010)"]
    assert lines[-1].split() == ["OCR", "image", "reliance", "15.500", "15.000", "(-0.500)",
                                 "15.600", "(+0.100)"]
    assert len({len(line) for line in lines}) == 1  # columns aligned


def test_record_noise_is_the_bernoulli_bound():
    assert demo.record_noise(0.5, 0.5, 100) == pytest.approx(math.sqrt(0.5 / 100))
    assert demo.record_noise(1.0, 0.0, 10) == 0.0
    # any [0, 1] scores: their standard error never exceeds the bound
    scores = np.random.default_rng(0).beta(0.3, 1.2, (2, 256))
    actual = math.sqrt(sum(s.var() / s.size for s in scores))
    assert actual <= demo.record_noise(*scores.mean(axis=1), 256)
    with pytest.raises(ValueError, match="n must be positive"):
        demo.record_noise(0.5, 0.5, 0)


def test_verdict_separates_a_large_gap_from_noise():
    findings = demo.verdict(demo.comparison(BEFORE, AFTER), "reasoning_only", "recap", 256)
    by_label = {line.split(":")[0]: line for line in findings}
    # IoU: 0.1 vs 0.19, bound sqrt((0.09 + 0.1539) / 256) = 0.0309 -> 2 x 0.062 < 0.09
    assert by_label["grounding IoU"].startswith(
        "grounding IoU: reasoning_only -0.100, recap -0.010; reasoning_only lost 0.090 more "
        "than recap (beyond 2 x")
    assert "0.062 with 256 records" in by_label["grounding IoU"]
    # char F1: 0.98 vs 1.0, bound 0.0087 -> 0.02 > 0.0175: beyond; with 64 records: within
    assert "beyond" in by_label["OCR char F1"]
    few = demo.verdict(demo.comparison(BEFORE, AFTER), "reasoning_only", "recap", 64)
    assert "WITHIN" in {line.split(":")[0]: line for line in few}["OCR char F1"]
    assert "reasoning accuracy" not in by_label  # perception only
    assert by_label["OCR image reliance"].endswith("reasoning_only lost 0.600 more than recap")
    swapped = demo.verdict(demo.comparison(BEFORE, AFTER), "recap", "reasoning_only", 256)
    assert "reasoning_only lost 0.090 more than recap" in swapped[0]


def test_read_run_takes_first_and_last_evaluation(tmp_path):
    lines = [dict(BEFORE), {"stage": "rl", "step": 1, "weight/reasoning/accuracy": 1.0},
             dict(AFTER["recap"], step=2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = demo.read_run(tmp_path)
    assert run["before"]["step"] == 0 and run["after"]["step"] == 2 and len(run["rl"]) == 1
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: expected an evaluation at RL step 0"):
        demo.read_run(tmp_path)


def test_plot_is_written(tmp_path):
    rl = {"reasoning_only": [{"step": s, "weight/reasoning/accuracy": 1.0,
                              "reward/reasoning/accuracy": 0.3 + 0.001 * s} for s in range(1, 31)],
          "recap": [{"step": s, "weight/reasoning/accuracy": 1.0 + 0.01 * s, "weight/ocr/ntp": 1.0,
                     ["reward/reasoning/accuracy", "reward/grounding/iou",
                      "ntp_loss/ocr/ntp"][s % 3]: 0.5} for s in range(1, 31)]}
    path = demo.plot(rl, tmp_path / "demo.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800


def test_method_config_from_the_stored_warmstart(tmp_path):
    config = demo.method_config("recap", tmp_path, steps=7, seed=3, eval_examples=32)
    assert config.model.path == str(tmp_path) and config.tokenizer.path == str(tmp_path)
    assert (config.rl.steps, config.seed, config.sft.steps) == (7, 3, 0)
    assert config.rl.method == "recap" and config.data.sources.ocr.eval_size == 32
    assert config.data.sources.grounding.layout == "grid"
    assert demo.method_config("reasoning_only", tmp_path, steps=7, seed=3,
                              eval_examples=32).rl.method == "reasoning_only"
