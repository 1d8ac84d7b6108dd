"""End to end: `recap_jax.train` on configs/demo.py shrunk by overrides (SFT then RL), resume
from a checkpoint, `recap_jax.evaluate`, the warm-start directory."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from recap_jax import train
from recap_jax.metrics_log import read_jsonl
from tests.short_run import ROOT, SHORT_RUN_OVERRIDES, cli_overrides, short_config

pytestmark = pytest.mark.xdist_group("short_run")
OBJECTIVES = ["reasoning/accuracy", "reasoning/format_think", "grounding/format_answer",
              "grounding/iou", "ocr/ntp"]
TIMING_KEYS = {"time", "tokens_per_s", "step_time_s", "eval_time_s"}


def lines(workdir, stage=None):
    records, bad = read_jsonl(str(workdir / "metrics.jsonl"))
    assert not bad
    return [r for r in records if stage is None or r["stage"] == stage]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_params_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_demo_runs_sft_then_rl_with_replay_and_recap(short_run):
    workdir, params, config = short_run
    sft, rl, evals = lines(workdir, "sft"), lines(workdir, "rl"), lines(workdir, "eval")
    assert [r["step"] for r in sft] == list(range(1, config.sft.steps + 1))
    assert [r["step"] for r in rl] == list(range(1, config.rl.steps + 1))
    assert [r["step"] for r in evals] == [0, config.rl.steps]
    # warm-start: mixed batches of all three sources; the summed next-token loss falls
    assert all(f"ntp_loss/{name}" in sft[0] for name in ("reasoning/ntp", "grounding/ntp", "ocr/ntp"))
    assert sft[-1]["loss"] < sft[0]["loss"]
    # RL: round robin over the three sources, the primary first
    assert [r["source"] for r in rl] == ["reasoning", "grounding", "ocr", "reasoning"]
    for record in rl:
        assert sorted(k[len("weight/"):] for k in record if k.startswith("weight/")) == \
            sorted(OBJECTIVES)
        assert all(f"recap/c/{o}" in record and f"recap/i/{o}" in record for o in OBJECTIVES)
        present = [k.split("/", 1)[1] for k in record if k.startswith(("reward/", "ntp_loss/"))]
        assert present and all(o.startswith(record["source"] + "/") for o in present)
        assert all(0.0 <= record[f"reward/{o}"] <= 1.0 for o in present if "ntp" not in o)
    for task, metrics in (("reasoning", ["accuracy", "format_think"]),
                          ("grounding", ["iou", "iou_thresholded", "format_answer"]),
                          ("ocr", ["ocr_char_f1", "ocr_exact"])):
        for metric in metrics + ["completion_length"]:
            assert all(f"eval/{task}/{metric}" in r for r in evals)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    total = config.sft.steps + config.rl.steps
    # every 2 steps in both stages, kept 3 at a time: SFT step 2 was rotated out
    assert steps == [config.sft.steps, total - 2, total]
    assert list((workdir / "tensorboard").iterdir())


def test_warmstart_directory_holds_the_sft_policy(short_run):
    """WORKDIR/warmstart loads with from_pretrained; RL then moved away from it."""
    from flax import nnx

    from recap_jax.models import qwen2_5_vl as qwen

    workdir, params, config = short_run
    model = qwen.from_pretrained(workdir / "warmstart")
    assert model.config.text.rope_theta == config.model.rope_theta  # the demo's, not the default
    warm = nnx.split(model)[1]
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(warm), jax.tree.leaves(params))]
    assert any(changed)
    assert (workdir / "warmstart" / "tokenizer.json").exists()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(short_run, tmp_path):
    """Stopped after the RL checkpoint at step 2 (later checkpoint removed), restarted: the
    final params are bitwise equal and metrics.jsonl reads the same (timings aside)."""
    workdir, params, config = short_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir, resumed_dir)
    total = config.sft.steps + config.rl.steps
    shutil.rmtree(resumed_dir / "checkpoints" / str(total))
    resumed_params = train.train(short_config(), str(resumed_dir))
    assert_params_equal(params, resumed_params)
    assert without_timing(lines(resumed_dir)) == without_timing(lines(workdir))
    superseded, _ = read_jsonl(str(resumed_dir / "metrics.superseded.jsonl"))
    assert sorted({(r["stage"], r["step"]) for r in superseded}) == [
        ("eval", 4), ("rl", 3), ("rl", 4)]


def test_resume_from_the_end_of_sft(short_run, tmp_path):
    """Only checkpoints up to the end of SFT left: RL restarts from the restored warm-start
    and ends bitwise where the uninterrupted run ended."""
    workdir, params, config = short_run
    resumed_dir = tmp_path / "from_sft"
    shutil.copytree(workdir, resumed_dir)
    for step in (resumed_dir / "checkpoints").iterdir():
        if step.name.isdigit() and int(step.name) > config.sft.steps:
            shutil.rmtree(step)
    resumed_params = train.train(short_config(), str(resumed_dir))
    assert_params_equal(params, resumed_params)
    assert without_timing(lines(resumed_dir)) == without_timing(lines(workdir))


def test_evaluate_prints_the_table_of_a_checkpoint(short_run):
    """`python -m recap_jax.evaluate` on the final checkpoint reproduces the run's final eval
    line (same params, greedy decoding) and prints one row per task and metric."""
    workdir, _, config = short_run
    total = config.sft.steps + config.rl.steps
    command = [sys.executable, "-m", "recap_jax.evaluate", "--config",
               str(ROOT / "configs" / "demo.py"), "--workdir", str(workdir),
               "--step", str(total), *cli_overrides()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    final = lines(workdir, "eval")[-1]
    table = json.loads((workdir / "eval" / f"checkpoint_{total}.json").read_text())["tasks"]
    for task, metrics in table.items():
        for metric, value in metrics.items():
            if metric == "num_examples":
                continue
            assert value == pytest.approx(final[f"eval/{task}/{metric}"], abs=1e-6)
            row = [line for line in result.stdout.splitlines()
                   if line.split()[:2] == [task, metric]]
            assert row and float(row[0].split()[2]) == pytest.approx(value, abs=1e-4)


def test_evaluate_nogreedy_gives_the_teacher_forced_metrics_only(short_run):
    """--nogreedy: the answer NLL / image reliance of the run's final eval line, no decoding,
    in its own file (the greedy table of the same checkpoint is not overwritten)."""
    workdir, _, config = short_run
    total = config.sft.steps + config.rl.steps
    command = [sys.executable, "-m", "recap_jax.evaluate", "--config",
               str(ROOT / "configs" / "demo.py"), "--workdir", str(workdir), "--nogreedy",
               *cli_overrides()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    final = lines(workdir, "eval")[-1]
    path = workdir / "eval" / f"checkpoint_{total}_teacher_forced.json"
    table = json.loads(path.read_text())["tasks"]
    assert set(table) == {"reasoning", "grounding", "ocr"}
    for task, metrics in table.items():
        assert set(metrics) == {"answer_nll", "answer_nll_other_image", "image_reliance",
                                "image_reliance_rows", "num_examples"}
        for metric in ("answer_nll", "answer_nll_other_image", "image_reliance"):
            assert metrics[metric] == pytest.approx(final[f"eval/{task}/{metric}"], abs=1e-6)


def test_cli_overrides_reach_the_config(tmp_path):
    """--config.x=v overrides and a bad value fails before anything is built."""
    command = [sys.executable, "-m", "recap_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
               "--workdir", str(tmp_path / "bad"), *cli_overrides({"rl.method": "nonsense"})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    assert "rl.method" in result.stderr and "recap" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    assert SHORT_RUN_OVERRIDES  # the same overrides the shared run uses


def test_sources_open_in_source_id_order():
    """Source id s means the same source for the replay, the objectives and the logs: the
    primary first, then by name (ConfigDict keys come back sorted, not as written)."""
    from recap_jax import plan, run_config
    from recap_jax.data.run_sources import open_sources

    config = short_config()
    names = run_config.source_names(config)
    assert names == ["reasoning", "grounding", "ocr"]
    sources = plan.build_plan(config).sources
    assert [s.name for s in open_sources(sources, "train")] == names
    assert [s.name for s in open_sources(sources, "eval")] == names
    config.data.primary = "ocr"
    assert run_config.source_names(config) == ["ocr", "grounding", "reasoning"]


def test_analysis_notebook_runs_on_a_real_run(short_run, monkeypatch):
    """colabs/analysis.ipynb, executed headless on the short run's workdir: every cell runs,
    the four figures and the before/after table of every task come out."""
    from tests.test_analysis import test_notebook_runs_headless_on_a_workdir

    test_notebook_runs_headless_on_a_workdir(short_run[0], monkeypatch)


def test_warmstart_box_targets_are_in_the_frame_the_model_sees(tmp_path):
    """A grounding image that smart_resize changes: the warm-start completion's box is in the
    resized frame, so the iou reward (which rescales predictions from that frame) gives the
    reference itself ~1. Before the fix the box stayed in the original frame."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from recap_jax import plan, policy, rewards
    from recap_jax.data.run_sources import WarmStartTargets
    from recap_jax.data.synthetic import SyntheticSource

    config = short_config(tokenizer__max_pixels=56 * 84)  # forces a downscale
    processor = policy.build_processor(plan.build_plan(config), str(tmp_path))
    source = SyntheticSource("grounding", size=8, image_size=(98, 154))
    targets = WarmStartTargets(source, processor)
    for i in range(len(source)):
        record = source.load(i)
        input_size = smart_resize(*record.image_size, factor=28, min_pixels=config.tokenizer.min_pixels,
                                  max_pixels=config.tokenizer.max_pixels)
        assert input_size != record.image_size
        context = dict(image_size=record.image_size, input_size=input_size)
        completion = targets.load(i).answer
        assert rewards.iou(completion, record.answer, **context) > 0.75  # whole-pixel rounding
        unscaled = WarmStartTargets(source).load(i).answer  # the box left in the original frame
        assert rewards.iou(unscaled, record.answer, **context) < 0.6


def test_demo_tokenizer_spells_ocr_text_one_token_per_letter(tmp_path):
    """The demo BPE is built without the OCR transcriptions, so a transcription is one token
    per glyph (a merge like "KL" would make the same glyph one token here, half a token there)."""
    from recap_jax import plan, policy
    from recap_jax.data.synthetic import OCR_ALPHABET, generate

    tokenizer = policy.build_processor(plan.build_plan(short_config()), str(tmp_path)).tokenizer
    for record in generate("ocr", "eval", 20):
        pieces = [tokenizer.decode([i]) for i in tokenizer(record.answer_text, add_special_tokens=False)["input_ids"]]
        assert pieces == list(record.answer_text)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in OCR_ALPHABET)


def test_sft_source_shares_restrict_the_warm_start_mixture(tmp_path):
    """sft.source_shares "0,0,1": every warm-start batch holds OCR records only (no next-token
    loss is logged for the other two sources); the default mixes all three."""
    config = short_config(sft__steps=3, rl__steps=0, eval__num_examples=0,
                          sft__source_shares="0,0,1")
    train.train(config, str(tmp_path / "ocr_only"))
    sft = lines(tmp_path / "ocr_only", "sft")
    assert len(sft) == 3
    for record in sft:
        assert "ntp_loss/ocr/ntp" in record
        assert not any(k in record for k in ("ntp_loss/reasoning/ntp", "ntp_loss/grounding/ntp"))
