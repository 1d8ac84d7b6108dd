"""The run plan: every config field is read by something, the plan's types carry the config's
values (precision wrapper, mesh, presets, RECAP variants, mini-batches), and the paper's
configs plan without their data."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recap_jax import plan, policy, precision, run_config
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.run_config import ConfigError
from tests.short_run import ROOT, load_config, short_config

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def paper_ready(config):
    """A paper config with placeholder local paths (not opened: check_paths=False)."""
    if config.model.require_path:
        config.model.path = "/models/qwen"
    for name in config.data.sources:
        source = config.data.sources[name]
        if source.kind != "synthetic":
            source.train = f"/data/{name}.parquet"
    return config


@pytest.mark.parametrize("name", ["base"] + CONFIGS)
def test_every_config_field_is_read_by_the_plan(name):
    config = run_config.base_config() if name == "base" else paper_ready(load_config(name))
    if name == "base":
        config.data.sources.reasoning = run_config.source_config("synthetic")
    assert plan.unread_fields(config) == []


def test_a_field_nothing_reads_is_reported():
    config = short_config()
    config.rl.unused_knob = 3  # e.g. a typo'd override target
    assert plan.unread_fields(config) == ["rl.unused_knob"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_plans(name):
    built = plan.build_plan(paper_ready(load_config(name)), check_paths=False)
    assert [s.name for s in built.stages][-1] == "rl"
    rl = built.stage("rl")
    assert rl.grpo.num_objectives == rl.objectives.num_objectives
    assert rl.grpo.max_completion_length == rl.max_new_tokens


def _optimizer_state(stage, params):
    return jax.eval_shape(stage.optimizer.init, params)


@pytest.mark.parametrize("param_dtype, wrapped", [("bfloat16", True), ("float32", False)])
def test_bf16_parameters_get_a_float32_master_copy(param_dtype, wrapped):
    built = plan.build_plan(short_config(model__param_dtype=param_dtype))
    params = {"w": jax.ShapeDtypeStruct((4, 4), jnp.dtype(param_dtype))}
    for stage in built.stages:
        state = _optimizer_state(stage, params)
        assert isinstance(state, precision.Float32MasterState) == wrapped, stage.name
        if wrapped:
            assert state.master["w"].dtype == jnp.float32


def test_a_bf16_update_below_resolution_survives_with_the_master_copy():
    """lr 1e-6 AdamW steps on bf16 weights near 1: without the master copy every update
    rounds away (bf16 spacing at 1 is 2^-7); the plan's optimizer accumulates them."""
    built = plan.build_plan(short_config(model__param_dtype="bfloat16", rl__learning_rate=1e-6,
                                         rl__warmup_fraction=0.0))
    rl = built.stage("rl")
    params = {"w": jnp.ones((64,), jnp.bfloat16)}
    grads = {"w": jnp.ones((64,), jnp.bfloat16)}
    state = rl.optimizer.init(params)
    for _ in range(rl.steps):
        updates, state = rl.optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    bare = optax.adamw(1e-6)
    bare_params, bare_state = {"w": jnp.ones((64,), jnp.bfloat16)}, None
    bare_state = bare.init(bare_params)
    for _ in range(rl.steps):
        updates, bare_state = bare.update(grads, bare_state, bare_params)
        bare_params = optax.apply_updates(bare_params, updates)
    assert np.all(np.asarray(bare_params["w"], np.float32) == 1.0)  # rounded away
    master = state.master["w"] if isinstance(state, precision.Float32MasterState) else None
    assert master is not None and np.all(np.asarray(master) < 1.0)


@pytest.mark.parametrize("preset", ["3b", "7b"])
def test_presets_build_abstractly_from_scratch(preset):
    """model.preset without a path: the real architecture's config, the model built with
    jax.eval_shape (nothing allocated), the parameter count of the published model."""
    config = short_config(model__preset=preset, tokenizer__path=str(ROOT))
    built = plan.build_plan(config, check_paths=False)
    model_config = policy.build_model_config(built.model)
    shapes = jax.eval_shape(lambda: model_lib.init_model(model_config, seed=0))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    expected = {"3b": 3.75e9, "7b": 8.29e9}[preset]  # Qwen2.5-VL-3B / -7B-Instruct
    assert abs(count / expected - 1) < 0.02, count


@pytest.mark.parametrize("variant", ["released", "paper", "dwa", "static"])
def test_every_recap_variant_is_selectable(variant):
    rl = plan.build_plan(short_config(recap__variant=variant)).stage("rl")
    assert rl.recap.variant == variant
    assert rl.recap.directions == rl.objectives.directions


def test_baselines_have_no_recap_and_lwf_a_reference():
    assert plan.build_plan(short_config(rl__method="uniform")).stage("rl").recap is None
    lwf = plan.build_plan(short_config(rl__method="lwf")).stage("rl")
    assert lwf.reference and lwf.grpo.beta == 0.01


def test_minibatches_are_allowed_and_reach_the_loss_and_schedule():
    rl = plan.build_plan(short_config(rl__num_minibatches=2, rl__prompts_per_step=4)).stage("rl")
    assert rl.grpo.num_minibatches == 2


def test_distributed_mesh_fields_reach_the_mesh_config():
    config = short_config(mesh__spec="fsdp=-1", mesh__distributed=True,
                          mesh__coordinator_address="127.0.0.1:9999", mesh__num_processes=2,
                          mesh__process_id=1)
    mesh = plan.build_plan(config).mesh
    assert (mesh.distributed, mesh.coordinator_address, mesh.num_processes, mesh.process_id) \
        == (True, "127.0.0.1:9999", 2, 1)
    with pytest.raises(ConfigError, match="mesh.distributed.*mesh.spec"):
        plan.build_plan(short_config(mesh__distributed=True))


def test_an_override_reaches_the_typed_config():
    """rl.epsilon_high -> GRPOConfig, rl.temperature -> the sampler, recap.window -> RECAP."""
    rl = plan.build_plan(short_config(rl__epsilon_high=0.28, rl__temperature=0.7,
                                      recap__window=3)).stage("rl")
    assert rl.grpo.epsilon_high == 0.28
    assert rl.sampling_params((1,), 0).temperature == 0.7
    assert rl.recap.window == 3


def test_model_package_does_not_import_training_and_parallel_not_the_model():
    import subprocess
    import sys

    code = ("import sys; import recap_jax.parallel; "
            "assert not any(m.startswith('recap_jax.models') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('recap_jax'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sources_per_update_averages_two_batches_into_one_step_on_their_union():
    """rl.sources_per_update=2 (the released hybrid run's gradient accumulation): two train
    steps on batches A and B move the parameters as one step on A + B does with the plan's
    optimizer for half the updates (equal token counts: the union's token mean is the mean of
    the two); the first of the two steps changes nothing."""
    from recap_jax.grpo import GRPOConfig
    from recap_jax.train_state import TrainState
    from recap_jax.train_step import make_train_step
    from tests.test_train_step import fixed_batch, init_params, logprob_fn

    def run(optimizer, batches):
        state = TrainState.create(init_params(jax.random.key(1), 0.5), optimizer, jax.random.key(0))
        step = make_train_step(GRPOConfig(group_size=4), logprob_fn, optimizer, donate_state=False)
        norms = []
        for batch in batches:
            state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
            norms.append(float(metrics["update_norm"]))
        return state.params, norms

    accumulating = plan.build_plan(short_config(rl__steps=4, rl__sources_per_update=2,
                                                rl__warmup_fraction=0.0)).stage("rl").optimizer
    single = plan.build_plan(short_config(rl__steps=2, rl__warmup_fraction=0.0)).stage("rl").optimizer
    a, b = fixed_batch(0, rows=8), fixed_batch(1, rows=8)
    union = jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b)
    accumulated, norms = run(accumulating, [a, b])
    one, _ = run(single, [union])
    assert norms[0] == 0.0 and norms[1] > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), accumulated, one)


def test_user_feature_fields_reach_their_types():
    """rl.importance_ratio / overlong_* / tis_cap -> GRPOConfig, model.freeze_vision -> the
    stage (logprob wrapper and zero vision updates), log.wandb* -> WandbConfig."""
    built = plan.build_plan(short_config(
        rl__importance_ratio="sequence", rl__overlong_buffer=4, rl__overlong_penalty=0.5,
        rl__tis_cap=2.0, rl__recompute_old_logprobs=True, model__freeze_vision=True,
        rl__reward_workers=2, log__wandb=True, log__wandb_project="p", log__wandb_mode="disabled"))
    rl = built.stage("rl")
    assert (rl.grpo.importance_ratio, rl.grpo.overlong_buffer, rl.grpo.overlong_penalty,
            rl.grpo.tis_cap) == ("sequence", 4, 0.5, 2.0)
    assert rl.freeze_vision and rl.reward_workers == 2
    assert (built.wandb.enabled, built.wandb.project, built.wandb.mode) == (True, "p", "disabled")
    with pytest.raises(ConfigError, match="config.rl.tis_cap"):  # TIS needs recomputed log-probs
        plan.build_plan(short_config(rl__tis_cap=2.0))


def test_model_attention_is_checked_and_set_by_the_run(tmp_path, capsys):
    """model.attention: a name outside attention.IMPLEMENTATIONS names the field; a valid one
    is what `train.build_run` sets for every later trace (and prints, with what it resolves to)."""
    from recap_jax import train
    from recap_jax.models.qwen2_5_vl import attention

    with pytest.raises(ConfigError, match="config.model.attention='flash'.*auto \\| xla \\| cudnn \\| pallas"):
        plan.build_plan(short_config(model__attention="flash"))
    built = plan.build_plan(short_config(model__attention="xla"))
    assert built.model.attention == "xla"
    try:
        train.build_run(built, str(tmp_path))
        assert attention.get_implementation() == "xla"
        assert "attention: xla -> xla on cpu" in capsys.readouterr().out
    finally:
        attention.set_implementation("auto")
