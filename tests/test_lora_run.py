"""LoRA in the training run (model.lora.rank > 0) on the short demo run: the base stays frozen
(warmstart/ and final/ differ from the initial model only in the targeted kernels, by exactly
the checkpoint's adapters merged), checkpoints hold the adapters and their optimizer state
only, a resume ends bitwise where the uninterrupted run ended, the adapters-only export merges
back to the same policy; the config's errors name the field."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from recap_jax import freeze, lora, lora_run, policy, rewards, train
from recap_jax import plan as plan_lib
from recap_jax.checkpointing import RunCheckpoints
from recap_jax.run_config import ConfigError
from recap_jax.tools import memory
from tests.short_run import ROOT, short_config
from tests.test_train_plan_runs import hashed_reward

pytestmark = pytest.mark.xdist_group("short_run")

LORA = dict(model__lora__rank=4, model__lora__alpha=8.0, rl__learning_rate=1e-2,
            sft__steps=0, eval__num_examples=0)


def leaves_by_path(params) -> dict[str, np.ndarray]:
    """{"language_model/layers/self_attn/q_proj/kernel": array, ...} of a model state."""
    return {re.sub(r"/value$", "", freeze.param_path(path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def is_targeted(name: str, config: lora.LoraConfig) -> bool:
    return any(re.search(p, name) for p in config.patterns)


def assert_only_targets_moved(before, after, config: lora.LoraConfig) -> None:
    """Targeted kernels changed, every other parameter bit-identical; 7 targets (q k v o gate
    up down of the stacked decoder layers)."""
    before, after = leaves_by_path(before), leaves_by_path(after)
    assert before.keys() == after.keys()
    targeted = [name for name in before if is_targeted(name, config)]
    assert len(targeted) == 7, targeted
    for name in before:
        if name in targeted:
            assert not np.array_equal(before[name], after[name]), name
        else:  # frozen: embeddings, norms, vision tower, merger, lm_head
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def assert_close(a, b) -> None:
    b = leaves_by_path(b)
    for name, value in leaves_by_path(a).items():
        np.testing.assert_allclose(value, b[name], rtol=1e-6, atol=1e-6, err_msg=name)


def initial_params(plan):
    return policy.build_params(plan, policy.build_model_config(plan.model))[1]


def checkpoint_policy(plan, workdir, step=None):
    """The merged policy of checkpoint ``step`` (default: the newest) of ``workdir``."""
    run = train.build_run(plan, str(workdir))
    try:
        return train.load_checkpoint_params(run, step or run.checkpoints.steps()[-1])
    finally:
        run.log.close()
        run.checkpoints.close()


@pytest.fixture
def varied_rewards(monkeypatch):
    """Rewards that vary per completion: every RL step has a gradient."""
    monkeypatch.setitem(rewards.REWARDS, "format_think", hashed_reward)
    monkeypatch.setitem(rewards.REWARDS, "iou", hashed_reward)


@pytest.fixture(scope="module")
def lora_run_dir(tmp_path_factory):
    """(workdir, returned params, config) of a short LoRA run: RL 4 steps, checkpoints at 2, 4."""
    patch = pytest.MonkeyPatch()
    patch.setitem(rewards.REWARDS, "format_think", hashed_reward)
    patch.setitem(rewards.REWARDS, "iou", hashed_reward)
    try:
        workdir = tmp_path_factory.mktemp("lora") / "run"
        config = short_config(**LORA)
        params = train.train(config, str(workdir))
        yield workdir, params, config
    finally:
        patch.undo()


def test_the_base_stays_frozen_and_final_is_the_merged_checkpoint(lora_run_dir):
    workdir, params, config = lora_run_dir
    plan = plan_lib.build_plan(config)
    final = policy.load_params(plan, str(workdir / "final"))
    assert_only_targets_moved(initial_params(plan), final, plan.model.lora)
    # final/ = the initial base + (alpha / r) A B of the last checkpoint's adapters
    assert_close(checkpoint_policy(plan, workdir), final)
    assert_close(params, final)
    assert not (workdir / "final" / lora_run.LORA_FILE).exists()  # merge_on_export: a full model


def test_checkpoints_hold_only_adapters_and_their_optimizer_state(lora_run_dir):
    workdir, _, config = lora_run_dir
    plan = plan_lib.build_plan(config)
    manager = RunCheckpoints(str(workdir / "checkpoints"))
    try:
        assert manager.steps() == [2, 4]
        meta = manager.read_meta(4)
    finally:
        manager.close()
    leaves = meta["leaves"]
    params = [(p, s) for p, s, _ in leaves if p.startswith(".params")]
    assert params and all(p.startswith(".params['adapters']") for p, _ in params)
    assert len(params) == 2 * 7  # A and B of 7 targeted kernels
    adapter_elements = sum(int(np.prod(s)) for _, s in params)
    assert adapter_elements == lora.count_params(initial_params(plan), plan.model.lora)["adapter"]
    moments = [(p, s) for p, s, _ in leaves if p.startswith(".opt_state") and len(s) > 0]
    # Adam's mu and nu of each adapter, nothing of the base
    assert sorted(tuple(s) for _, s in moments) == sorted(2 * [tuple(s) for _, s in params])
    assert all(re.search(r"_proj/kernel|qkv/kernel", p) for p, _ in moments)


@pytest.mark.slow
def test_resume_ends_where_the_uninterrupted_run_ended(lora_run_dir, tmp_path, varied_rewards):
    workdir, params, config = lora_run_dir
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")  # restart from RL step 2
    resumed = train.train(short_config(**LORA), str(resumed_dir))
    for (name, a), b in zip(leaves_by_path(params).items(), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)


@pytest.mark.slow
def test_adapters_only_export_merges_back_to_the_policy(lora_run_dir, tmp_path, varied_rewards):
    """merge_on_export=False: final/ holds adapters.safetensors and lora.json (no model
    weights); merged into their base they are the policy the merged export holds (the run
    resumed from RL step 2, so only the export differs)."""
    workdir, params, _ = lora_run_dir
    adapters_dir = tmp_path / "adapters"
    shutil.copytree(workdir, adapters_dir)
    shutil.rmtree(adapters_dir / "final")
    shutil.rmtree(adapters_dir / "checkpoints" / "4")
    config = short_config(**LORA, model__lora__merge_on_export=False)
    train.train(config, str(adapters_dir))
    final = adapters_dir / "final"
    names = {p.name for p in final.iterdir()}
    assert {lora_run.ADAPTERS_FILE, lora_run.LORA_FILE} <= names
    assert not names & {"model.safetensors", "config.json"}
    meta = json.loads((final / lora_run.LORA_FILE).read_text())
    assert (meta["rank"], meta["alpha"], meta["scale"]) == (4, 8.0, 2.0)
    assert meta["base"] == ""  # the random base of the seed (no model.path, no warm-start)
    run = train.build_run(plan_lib.build_plan(config), str(adapters_dir))
    try:
        merged = train.load_final_params(run)
    finally:
        run.log.close()
        run.checkpoints.close()
    assert_close(params, merged)


@pytest.mark.slow
def test_a_lora_warm_start_exports_the_merged_base_rl_adapts(tmp_path, varied_rewards):
    """SFT with LoRA, then RL with LoRA: warmstart/ is the initial model with SFT's adapters
    merged (only the targets moved) and the RL stage's base; final/ moves only the targets
    again, by the RL checkpoint's adapters merged into warmstart/."""
    config = short_config(**dict(LORA, sft__steps=2, rl__steps=2))
    plan = plan_lib.build_plan(config)
    train.train(config, str(tmp_path))
    warmstart = policy.load_params(plan, str(tmp_path / "warmstart"))
    final = policy.load_params(plan, str(tmp_path / "final"))
    assert_only_targets_moved(initial_params(plan), warmstart, plan.model.lora)
    assert_only_targets_moved(warmstart, final, plan.model.lora)
    assert_close(checkpoint_policy(plan, tmp_path), final)


@pytest.mark.parametrize("extra,match", [
    (dict(model__lora__targets="attention,ffn"), r"config\.model\.lora\.targets='attention,ffn'"),
    (dict(model__lora__dropout=1.5), r"config\.model\.lora\.dropout=1\.5.*\[0, 1\)"),
    (dict(model__lora__alpha=0.0), r"config\.model\.lora\.alpha=0\.0"),
    (dict(model__lora__rank=-2), r"config\.model\.lora\.rank=-2"),
    (dict(model__lora__targets="attention,vision", model__freeze_vision=True),
     r"config\.model\.lora\.targets adapts the vision tower, which model\.freeze_vision freezes"),
])
def test_lora_config_errors_name_the_field(extra, match):
    config = short_config(**dict(dict(model__lora__rank=4), **extra))
    with pytest.raises(ConfigError, match=match):
        plan_lib.build_plan(config)


def test_lora_is_off_by_default_and_targets_are_named_groups():
    assert plan_lib.build_plan(short_config()).model.lora is None
    plan = plan_lib.build_plan(short_config(model__lora__rank=8, model__lora__targets="mlp,vision"))
    assert plan.model.lora.rank == 8 and plan.model.lora.scale == 2.0
    assert plan.model.lora.patterns == lora.DECODER_TARGETS[1:] + lora.VISION_TARGETS


def test_a_7b_lora_plan_fits_one_80_gib_device_where_full_fine_tuning_cannot():
    """tools.memory on configs/hybrid_7b.py with model.lora.rank=16 on one device (B = 2
    prompts x G = 4, prompts of 1,024 + completions of 512 tokens, logits chunk 256): the
    frozen bf16 base (15.4 GiB) and rank-16 adapters with their Adam state (< 1 GiB) fit
    80 GiB with the compiled step's temporaries. Full fine-tuning of the same run cannot: its
    bf16 params, float32 master copy and Adam moments alone take 139 GiB."""
    source = str(ROOT / "configs" / "hybrid_7b.py")
    workload = ["--config.rl.prompts_per_step=2", "--config.rl.max_new_tokens=512",
                "--config.data.prompt_buckets=(1024,)", "--config.model.logits_chunk=256",
                "--config.mesh.spec="]  # no mesh: one device, as tools.memory plans such a run

    def run_plan(extra=()):
        config, _ = memory.planning_config(memory.load_run_config(source, workload + list(extra)),
                                           source, None)
        return plan_lib.build_plan(config, check_paths=False)

    lora_plan = run_plan(["--config.model.lora.rank=16"])
    mesh = memory.mesh_of(lora_plan)
    assert mesh.devices.size == 1
    report = memory.plan_run_memory(lora_plan, mesh)
    table = report.table(80)
    assert "fits in 80 GiB per device" in table and "of which LoRA adapters" in table, table
    plan = report.largest
    assert plan.adapters < 0.2 * memory.GIB and plan.opt_state < 4 * plan.adapters
    assert plan.params - plan.adapters > 15 * memory.GIB  # the whole bf16 base is on the device
    # full fine-tuning: the same run's train state, sized from its shardings (no compile needed)
    full_plan = run_plan()
    (stage,) = full_plan.stages
    _, state = memory.abstract_train_state(policy.build_model_config(full_plan.model), mesh,
                                           full_plan.model.precision, stage.optimizer, strict=False)
    full = memory.bytes_per_device(state.params) + memory.bytes_per_device(state.opt_state)
    assert full > 130 * memory.GIB
