"""The preflight memory plan from a run config (tools.memory --config configs/x.py): the workload
read from the config (prompts per step, G, bucket and max_new_tokens lengths, the image budget
from max_pixels, dtypes, remat, logits chunk), the model from model.path's config.json or the
preset (planning before the download), numbers from the compiled step equal to the preset flags'
for the same run, and a one-line error for every bad argument."""

import json
import os
import subprocess
import sys

import pytest

from recap_jax import plan as plan_lib
from recap_jax import policy
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.tools import memory
from tests.short_run import ROOT, load_config

TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.vision_hidden_size": 32,
        "model.text_layers": 1, "model.vision_depth": 1, "sft.steps": 0, "rl.method": "reasoning_only",
        "rl.prompts_per_step": 8, "rl.group_size": 2, "rl.max_new_tokens": 8, "rl.log_lambda_effect": False,
        "sft.batch_size": 8, "eval.batch_size": 8}


def overrides(extra=None) -> list[str]:
    return [f"--config.{k}={v}" for k, v in dict(TINY, **(extra or {})).items()]


def run_plan_of(name: str, extra: list[str] = (), mesh: str | None = "fsdp=8"):
    """(RunPlan, notes) of configs/<name>.py as the memory tool reads it."""
    source = str(ROOT / "configs" / f"{name}.py")
    config, notes = memory.planning_config(memory.load_run_config(source, list(extra)), source, mesh)
    return plan_lib.build_plan(config, check_paths=False), notes


def load_run_config_demo(mesh_spec: str):
    """configs/demo.py with TINY and ``mesh.spec`` as given (not filled in by planning_config)."""
    config = memory.load_run_config(str(ROOT / "configs" / "demo.py"), overrides())
    config.mesh.spec = mesh_spec
    return config


def fields(plan: memory.MemoryPlan) -> dict:
    out = dict(vars(plan))
    out.pop("compile_seconds")
    return out


# --------------------------------------------------------------------------- reading the config


def test_the_hybrid_7b_workload_comes_from_its_config():
    plan, notes = run_plan_of("hybrid_7b")
    model_config = policy.build_model_config(plan.model)
    assert model_config.text.hidden_size == 3584 and model_config.text.num_hidden_layers == 28  # the 7b preset
    assert any("7b preset" in n and "hybrid_7b.py" in n for n in notes)
    assert any("not read when planning" in n for n in notes)
    (stage,) = plan.stages
    workload = memory.stage_workload(plan, stage, model_config)
    # B prompts x G, prompts padded to the largest bucket, completions of max_new_tokens, one image of
    # the largest 28-px square under max_pixels (the released 401,408 px: 633 px -> 616, 22 x 22 tokens)
    raw = load_config("hybrid_7b")
    side = int(raw.tokenizer.max_pixels ** 0.5) // 28 * 28
    assert workload == memory.Workload(batch=raw.rl.prompts_per_step, group_size=raw.rl.group_size,
                                       prompt_len=max(raw.data.prompt_buckets),
                                       completion_len=raw.rl.max_new_tokens, images=1, image_size=side)
    assert workload.tokens_per_image(model_config) == (side // 28) ** 2
    assert (plan.model.param_dtype, plan.model.remat) == ("bfloat16", "full")


def test_the_rlvr_3b_workload_and_model_come_from_its_config():
    plan, notes = run_plan_of("rlvr_only_3b", ["--config.rl.max_new_tokens=512", "--config.model.logits_chunk=128"])
    model_config = policy.build_model_config(plan.model)
    assert model_config.text.hidden_size == 2048  # 3b, from the file name
    workload = memory.stage_workload(plan, plan.stages[0], model_config)
    assert (workload.batch, workload.group_size, workload.completion_len) == (16, 4, 512)
    assert plan.model.logits_chunk == 128
    assert plan.stages[0].objectives.num_objectives == 8  # K = 8: the step compiled is the run's own


def test_an_explicit_preset_or_path_wins_over_the_file_name(tmp_path):
    plan, notes = run_plan_of("hybrid_7b", ["--config.model.preset=3b"])
    assert policy.build_model_config(plan.model).text.hidden_size == 2048
    assert any("model.preset=3b" in n for n in notes)
    (tmp_path / "config.json").write_text(json.dumps(config_lib.tiny(512).to_hf_dict()))
    plan, notes = run_plan_of("hybrid_7b", [f"--config.model.path={tmp_path}"])
    assert policy.build_model_config(plan.model).text.hidden_size == 64
    assert not any("preset" in n for n in notes)


def test_the_image_budget_respects_the_prompt_and_the_patch_buckets():
    plan, _ = run_plan_of("demo", overrides())
    model_config = policy.build_model_config(plan.model)
    workload = memory.stage_workload(plan, plan.stages[0], model_config)
    # the demo's patch buckets stop at 64 patches per image: 8 x 8 patches of 14 px
    assert workload.image_size == 112 and workload.patches_per_image(model_config) == 64
    plan, _ = run_plan_of("demo", overrides({"data.patch_buckets": "(100000,)", "tokenizer.max_pixels": 10 ** 7}))
    workload = memory.stage_workload(plan, plan.stages[0], model_config)
    assert workload.tokens_per_image(model_config) + 3 <= workload.prompt_len == 256  # shrunk to fit the prompt
    assert memory.image_side(1280 * 28 * 28, 28) == 980 and memory.image_side(401408, 28) == 616
    assert memory.image_side(100, 28) == 28


def test_multi_image_prompts_share_the_prompt_and_patch_budget():
    """--images 3 with a run config: three images per prompt, each shrunk until all three fit
    the largest patch bucket and the prompt (3 x (tokens + 2 delimiters) + 1 text token)."""
    plan, _ = run_plan_of("demo", overrides({"data.patch_buckets": "(64, 192)"}))
    model_config = policy.build_model_config(plan.model)
    one = memory.stage_workload(plan, plan.stages[0], model_config)
    three = memory.stage_workload(plan, plan.stages[0], model_config, images=3)
    # one image: 168 px (12 x 12 = 144 patches <= 192); three of them (432) do not fit, three of
    # 112 px (3 x 64 = 192) do
    assert (one.images, one.image_size, three.images, three.image_size) == (1, 168, 3, 112)
    plan, _ = run_plan_of("demo", overrides({"data.patch_buckets": "(64, 100)"}))
    three = memory.stage_workload(plan, plan.stages[0], model_config, images=3)
    # 3 x 36 patches (84 px) = 108 > 100; 3 x 16 (56 px) = 48 fits
    assert three.image_size == 56 and 3 * three.patches_per_image(model_config) <= 100


def test_images_flag_reaches_the_plan_of_a_run_config(capsys):
    memory.main(["--config", str(ROOT / "configs" / "demo.py"), "--mesh", "fsdp=8", "--images", "3",
                 *overrides({"data.patch_buckets": "(64, 192)"})])
    assert "3 image(s) of 112x112 px per prompt" in capsys.readouterr().out


# --------------------------------------------------------------------------- the compiled plans


def test_the_config_path_plans_what_the_equivalent_preset_flags_plan(tmp_path, capsys):
    """configs/demo.py (tiny, reasoning_only) vs the flags describing the same run: the same
    compiled step, so the same bytes in every row of the table."""
    plan, _ = run_plan_of("demo", overrides())
    model_config = policy.build_model_config(plan.model)
    (tmp_path / "config.json").write_text(json.dumps(model_config.to_hf_dict()))
    workload = memory.stage_workload(plan, plan.stages[0], model_config)
    from_config = memory.main(["--config", str(ROOT / "configs" / "demo.py"), "--mesh", "fsdp=8",
                               "--device-memory-gib", "0.001", *overrides()])
    out = capsys.readouterr().out
    from_flags = memory.main([
        "--config", str(tmp_path), "--mesh", "fsdp=8", "--batch", str(workload.batch),
        "--group-size", str(workload.group_size), "--prompt-len", str(workload.prompt_len),
        "--completion-len", str(workload.completion_len), "--images", "1", "--image-size", str(workload.image_size),
        "--param-dtype", plan.model.param_dtype, "--compute-dtype", plan.model.compute_dtype,
        "--remat", plan.model.remat, "--logits-chunk", str(plan.model.logits_chunk)])
    assert fields(from_config) == fields(from_flags)
    assert from_config.temporaries > 0 and from_config.params > 0
    assert "[rl] B=8 prompts x G=2, prompt 256 + completion 8 tokens" in out
    assert "does not fit in 0.001 GiB per device" in out


def test_plan_run_memory_counts_the_reference_policy_and_answers_fits():
    plan, _ = run_plan_of("demo", overrides({"rl.method": "lwf"}))
    mesh = memory.mesh_of(plan)
    report = memory.plan_run_memory(plan, mesh)
    (stage,) = report.stages
    assert stage.plan.reference == stage.plan.params > 0  # lwf's frozen policy stays on the device
    assert "reference policy" in report.table(80)
    peak = report.peak_bytes
    assert peak == max(stage.plan.step_peak, stage.plan.generation_peak)
    assert report.fits(peak / memory.GIB) and not report.fits(0.99 * peak / memory.GIB)
    assert report.table(0.001).endswith(report.verdict(0.001))
    assert report.verdict(0.001).startswith("does not fit in 0.001 GiB per device")


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/nope.py"], "configs/nope.py: no such file"),
    (["--config", "configs/demo.py", "--config.rl.nofield=3"], "a field the config does not have"),
    (["--config", "configs/demo.py", "--config.rl.steps=abc"], "--config.rl.steps=abc"),
    (["--config", "configs/demo.py", "--batch", "4"], "--batch: with a run config the workload comes from"),
    (["--config", "7b", "--config.rl.steps=3"], "need a configs/*.py run config"),
    (["--config", "configs/demo.py", "--mesh", "fsdp=3"], "needs 3 devices"),
    (["--config", "7b", "--remat", "most"], "--remat: invalid choice"),
    (["--config", "7b", "--batch", "3", "--mesh", "fsdp=8"], "--batch 3 is invalid"),
    (["--config", "foo"], "neither a preset"),
    (["--config", "configs/hybrid_7b.py", "--config.model.path=/nonexistent"],
     "--config.model.path: /nonexistent: no config.json found"),
])
def test_bad_arguments_get_one_line_and_no_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        memory.main([a.replace("configs/", str(ROOT / "configs") + "/") for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err


def test_a_python_file_where_json_is_expected_is_one_line_from_the_command_line(tmp_path):
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text((ROOT / "configs" / "hybrid_7b.py").read_text())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "recap_jax.tools.memory", "--config", str(checkpoint)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "not valid JSON" in lines[0] and str(checkpoint) in lines[0], result.stderr


# --------------------------------------------------------------------------- train's preflight


def test_preflight_prints_the_plan_and_refuses_a_run_that_does_not_fit(capsys, caplog):
    plan, _ = run_plan_of("demo", overrides())
    mesh = memory.mesh_of(plan)
    assert memory.preflight(plan, mesh) is None  # on a CPU: no device limit to plan against
    printed = []
    report = memory.preflight(plan, mesh, device_gib=80, echo=printed.append)
    assert report.fits(80) and printed == [report.table(80)]
    single = memory.preflight(plan_lib.build_plan(load_run_config_demo(mesh_spec=""), check_paths=False), None,
                              device_gib=80, echo=printed.append)  # a run without mesh.spec: one device
    assert single.stages[0].plan.params > report.stages[0].plan.params  # unsharded
    tiny = 0.5 * report.peak_bytes / memory.GIB
    with pytest.raises(memory.MemoryPlanError, match=r"does not fit in .* GiB.*--config.run.ignore_memory_plan=True"):
        memory.preflight(plan, mesh, device_gib=tiny, echo=printed.append)
    assert memory.preflight(plan, mesh, device_gib=tiny, ignore=True, echo=printed.append) is not None
    assert any("(ignored)" in r.getMessage() for r in caplog.records)
