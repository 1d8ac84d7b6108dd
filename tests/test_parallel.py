"""Sharding over device meshes (8 simulated CPU devices, see conftest.py).

The reference of every sharded computation is the same computation on one device with no
mesh: a sharded forward and a sharded GRPO step must reproduce it (tolerances below), the
parameters must really be split (per-device shard shapes worked out by hand), and a mesh
that does not divide the model or the batch must fail with a message before compiling.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recap_jax import parallel, sampling
from recap_jax import precision as precision_lib
from recap_jax.grpo import GRPOConfig
from recap_jax.models.qwen2_5_vl import checkpoint
from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl import model as M
from recap_jax.models.qwen2_5_vl import text as text_lib
from recap_jax.models.qwen2_5_vl.sharded import init_sharded_model
from recap_jax.tools import memory
from recap_jax.train_state import TrainState, make_optimizer
from recap_jax.train_step import make_train_step

# float32 everywhere; a mesh only reorders the sums (all-reduces over 2-8 partial sums).
LOGPROB_ATOL = 2e-5  # per-token log-probs (magnitudes ~5)
METRIC_RTOL = 1e-5  # loss and gradient norm
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # every gradient entry (entries are ~1e-4 .. 1e-1)
SGD_LR = 0.5  # the equality step is plain SGD, so params change by exactly -lr * gradient

MESHES = ["fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]
GROUP = 2
CFG = C.tiny(vocab_size=256, text_layers=2, vision_depth=2, fullatt_block_indexes=(1,))
# 8 prompts (one 4x4-patch image each) x 2 completions of 6 tokens
WORKLOAD = memory.Workload(batch=8, group_size=GROUP, prompt_len=12, completion_len=6, images=1, image_size=56)


def compile_counter():
    """A list that grows by one per XLA backend compilation while registered."""
    events = []

    def listener(name, *_, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def host_batch():
    batch = memory.example_batch(CFG, WORKLOAD, seed=0)
    mask = batch["completion_mask"]
    assert 0 < mask.sum() < mask.size  # some completions end early
    return batch


def grpo_step(graphdef, optimizer):
    return make_train_step(GRPOConfig(group_size=GROUP), sampling.make_logprob_fn(graphdef, GROUP), optimizer)


def unsharded_init(seed):
    """(graphdef, params) of init_model run under one jit on one device (as init_sharded_model
    runs it; eager init_model differs in the last bit of some normal draws)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.init_model(CFG, seed=seed)))
    return graphdef, jax.jit(lambda: nnx.state(M.init_model(CFG, seed=seed)))()


@pytest.fixture(scope="module")
def reference(host_batch):
    """One device, no mesh: log-probs, and one SGD step's metrics and gradient."""
    graphdef, params = unsharded_init(seed=0)
    batch = jax.tree.map(jnp.asarray, host_batch)
    logprobs = jax.jit(sampling.make_logprob_fn(graphdef, GROUP))(params, batch)[0]
    before = flat(params)
    state = TrainState.create(params, optax.sgd(SGD_LR), jax.random.key(0))
    new_state, metrics = grpo_step(graphdef, optax.sgd(SGD_LR))(state, batch, np.ones((1,), np.float32))
    grads = {k: (before[k] - v) / SGD_LR for k, v in flat(new_state.params).items()}
    return np.asarray(logprobs), {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}, grads, before


@pytest.fixture(scope="module", params=MESHES)
def sharded(request, host_batch):
    """The reference's computations on a mesh, from init_sharded_model and shard_batch."""
    mesh = parallel.make_mesh(parallel.parse_mesh_spec(request.param))
    model = init_sharded_model(CFG, mesh, seed=0)
    graphdef, params = nnx.split(model)
    batch = parallel.shard_batch(host_batch, mesh, batch_axes=memory.POLICY_BATCH_AXES)
    before = flat(params)
    with parallel.use_mesh(mesh):
        logprobs = jax.jit(sampling.make_logprob_fn(graphdef, GROUP))(params, batch)[0]
        state = parallel.create_sharded(lambda p: TrainState.create(p, optax.sgd(SGD_LR), jax.random.key(0)),
                                        params, mesh=mesh)
        new_state, metrics = grpo_step(graphdef, optax.sgd(SGD_LR))(state, batch, np.ones((1,), np.float32))
    grads = {k: (before[k] - v) / SGD_LR for k, v in flat(new_state.params).items()}
    return {"spec": request.param, "mesh": mesh, "init": before, "logprobs": np.asarray(logprobs),
            "metrics": metrics, "grads": grads, "state": new_state}


def test_sharded_init_equals_unsharded_init(sharded, reference):
    unsharded, got = reference[3], sharded["init"]
    assert got.keys() == unsharded.keys()
    for name, value in unsharded.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_sharded_forward_equals_single_device(sharded, reference):
    np.testing.assert_allclose(sharded["logprobs"], reference[0], rtol=0, atol=LOGPROB_ATOL,
                               err_msg=sharded["spec"])


def test_sharded_gradient_step_equals_single_device(sharded, reference):
    _, ref_metrics, ref_grads, _ = reference
    for name in ("loss", "grad_norm", "policy_loss"):
        np.testing.assert_allclose(float(sharded["metrics"][name]), ref_metrics[name], rtol=METRIC_RTOL,
                                   err_msg=name)
    assert ref_metrics["grad_norm"] > 1e-3  # a real gradient, not a vacuous comparison
    for name, g in ref_grads.items():
        np.testing.assert_allclose(sharded["grads"][name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                   err_msg=f"{sharded['spec']} {name}")
    # the updated parameters keep their shardings (no drift that would force a recompile)
    params = sharded["state"].params
    for leaf, expected in zip(jax.tree.leaves(params), jax.tree.leaves(parallel.param_shardings(params, sharded["mesh"]))):
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)


# ----------------------------------------------------------------------------- shard shapes
# tiny(): hidden 64, 4 heads / 2 kv heads of 16, MLP 128, vocab 256; vision hidden 32, 2 heads, merger 128.
SHARD_SHAPES = {  # fsdp=4 x tensor=2: hidden dims split 4 ways, heads / MLP / vocab split 2 ways
    ("language_model", "embed_tokens", "embedding"): ((256, 64), (128, 16)),
    ("language_model", "layers", "self_attn", "q_proj", "kernel"): ((2, 64, 4, 16), (2, 16, 2, 16)),
    ("language_model", "layers", "self_attn", "k_proj", "kernel"): ((2, 64, 2, 16), (2, 16, 1, 16)),
    ("language_model", "layers", "self_attn", "o_proj", "kernel"): ((2, 4, 16, 64), (2, 2, 16, 16)),
    ("language_model", "layers", "mlp", "down_proj", "kernel"): ((2, 128, 64), (2, 64, 16)),
    ("language_model", "norm", "scale"): ((64,), (16,)),
    ("lm_head", "kernel"): ((64, 256), (16, 128)),
    ("visual", "blocks", "attn", "qkv", "kernel"): ((2, 32, 3, 2, 16), (2, 8, 3, 1, 16)),
    ("visual", "merger", "mlp_0", "kernel"): ((128, 128), (32, 64)),
    ("visual", "patch_embed", "proj", "kernel"): ((1176, 32), (1176, 8)),
}


def assert_split(tree, expected, mesh_size=8):
    """Each named array has its full shape, every device holds a shard of the expected shape,
    and the distinct shards tile the array."""
    flat_tree = dict(nnx.to_flat_state(tree))
    for path, (full, shard) in expected.items():
        array = flat_tree[path].get_value()
        assert array.shape == full, path
        shards = array.addressable_shards
        assert len(shards) == mesh_size and all(s.data.shape == shard for s in shards), path
        blocks = {tuple(i.start or 0 for i in s.index) for s in shards}
        assert len(blocks) == np.prod(full) // np.prod(shard), path


def test_parameters_are_split(sharded):
    if sharded["spec"] != "fsdp=4,tensor=2":
        pytest.skip("shard shapes are worked out for fsdp=4 x tensor=2")
    assert_split(sharded["state"].params, SHARD_SHAPES)  # after a train step, still split


def test_mesh_that_does_not_divide_the_model_fails_before_compiling():
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("fsdp=2,tensor=3"), devices=jax.devices()[:6])
    counter, stop = compile_counter()
    try:
        with pytest.raises(parallel.ShardingError) as error:
            init_sharded_model(CFG, mesh)
    finally:
        stop()
    assert not counter  # failed before any compilation
    message = str(error.value)
    assert re.search(r"\['k_proj'\]\['kernel'\].*dimension 2 \(kv_heads=2\).*\('tensor',\) of size 3", message)
    assert re.search(r"\['q_proj'\]\['kernel'\].*dimension 2 \(heads=4\)", message)
    assert "embed_tokens" in message and "(vocab=256)" in message  # every problem listed at once
    # the fallback asked for explicitly: replicate what does not divide
    specs = parallel.param_shardings(nnx.eval_shape(lambda: M.init_model(CFG)), mesh, strict=False)
    k_proj = dict(nnx.to_flat_state(specs))[("language_model", "layers", "self_attn", "k_proj", "kernel")]
    assert k_proj.get_value().spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_batch_that_does_not_divide_the_mesh_fails_with_the_leaf_named(host_batch):
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("data=2,fsdp=2,tensor=2"))
    six_rows = jax.tree.map(lambda x: x[:6], {k: host_batch[k] for k in ("completions", "rewards")})
    with pytest.raises(parallel.ShardingError, match=r"\['completions'\].*6 rows.*4 batch shards"):
        parallel.shard_batch(six_rows, mesh)


# ----------------------------------------------------------------------------- compile once
def test_ten_adamw_steps_compile_once():
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("data=2,fsdp=2,tensor=2"))
    text_only = memory.example_batch(CFG, dataclasses.replace(WORKLOAD, images=0), seed=1)
    model = init_sharded_model(CFG, mesh, seed=1)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(1e-3, 10)
    step = grpo_step(graphdef, optimizer)
    counter, stop = compile_counter()
    try:
        with parallel.use_mesh(mesh):
            state = parallel.create_sharded(lambda p: TrainState.create(p, optimizer, jax.random.key(0)), params,
                                            mesh=mesh)
            counter.clear()  # count the train step's compilations only
            losses = []
            for i in range(10):
                batch = parallel.shard_batch(dict(text_only, rewards=text_only["rewards"] * (i + 1)), mesh,
                                             batch_axes=memory.POLICY_BATCH_AXES)
                state, metrics = step(state, batch, np.ones((1,), np.float32))
                losses.append(float(metrics["loss"]))
    finally:
        stop()
    assert len(counter) == 1, counter
    assert int(state.step) == 10 and np.all(np.isfinite(losses))
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's moments are split like the parameters
    moments = {("language_model", "layers", "self_attn", "q_proj", "kernel"): ((2, 64, 4, 16), (2, 32, 2, 16)),
               ("lm_head", "kernel"): ((64, 256), (32, 128)), ("language_model", "norm", "scale"): ((64,), (32,))}
    assert_split(adam.mu, moments)
    assert_split(adam.nu, moments)


# ----------------------------------------------------------------------------- checkpoints
def test_from_pretrained_places_each_tensor_on_its_shards(tmp_path):
    model = M.init_model(CFG, seed=3)
    checkpoint.save_pretrained(model, tmp_path)
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("fsdp=4,tensor=2"))
    loaded = checkpoint.from_pretrained(tmp_path, mesh=mesh)
    expected = dict(nnx.to_flat_state(parallel.param_shardings(loaded, mesh)))
    original = dict(nnx.to_flat_state(nnx.state(model)))
    for path, variable in nnx.to_flat_state(nnx.state(loaded)):
        array = variable.get_value()
        assert array.sharding == expected[path].get_value(), path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(original[path].get_value()), err_msg=str(path))
    q = dict(nnx.to_flat_state(nnx.state(loaded)))[("language_model", "layers", "self_attn", "q_proj", "kernel")]
    assert q.get_value().addressable_shards[0].data.shape == (2, 16, 2, 16)
    bad_mesh = parallel.make_mesh(parallel.parse_mesh_spec("fsdp=2,tensor=3"), devices=jax.devices()[:6])
    with pytest.raises(parallel.ShardingError, match=r"k_proj'\]\['kernel'\].*kv_heads=2"):
        checkpoint.from_pretrained(tmp_path, mesh=bad_mesh)


def test_shard_model_moves_an_unsharded_model_onto_its_shards():
    model = M.init_model(CFG, seed=4)
    before = flat(nnx.state(model))
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("fsdp=4,tensor=2"))
    assert parallel.shard_model(model, mesh) is model
    assert_split(nnx.state(model), SHARD_SHAPES)
    for name, value in flat(nnx.state(model)).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


# ----------------------------------------------------------------------------- mesh config
def test_mesh_axes_sizes_and_types():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    config = parallel.get_config()
    config.tensor = 4
    assert dict(parallel.make_mesh(config).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert parallel.parse_mesh_spec("data=-1,tensor=2") == parallel.MeshConfig(data=-1, fsdp=1, tensor=2)


@pytest.mark.parametrize("fields, message", [
    ({"fsdp": 0}, r"mesh\.fsdp: must be a positive integer or -1"),
    ({"data": -1, "fsdp": -1}, r"mesh\.fsdp: at most one axis may be -1"),
    ({"tensor": 2.0}, r"mesh\.tensor"),
    ({"fsdp": 3, "tensor": 2}, r"mesh\.fsdp: the mesh .* needs 6 devices but 8"),
    ({"data": 3, "fsdp": -1}, r"mesh\.fsdp: -1 cannot take the rest"),
    ({"coordinator_address": "localhost:1234"}, r"mesh\.distributed: is False"),
    ({"distributed": True, "coordinator_address": "localhost"}, r"mesh\.coordinator_address: must be 'host:port'"),
    ({"distributed": True, "coordinator_address": "h:1", "num_processes": 2}, r"mesh\.process_id: is required"),
    ({"distributed": True, "coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     r"mesh\.process_id: 2 is not below num_processes=2"),
    ({"pipeline": 2}, r"mesh\.pipeline: unknown field"),
])
def test_bad_mesh_config_names_the_field(fields, message):
    with pytest.raises(parallel.MeshConfigError, match=message):
        parallel.make_mesh(fields)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_rows_with_one():
    x = jnp.ones((8, 4, 16))
    assert parallel.constrain(x, text_lib.HIDDEN_AXES) is x
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("data=2,fsdp=2,tensor=2"))
    with parallel.use_mesh(mesh):
        y = jax.jit(lambda v: parallel.constrain(v * 2, text_lib.HIDDEN_AXES))(x)
        odd = jax.jit(lambda v: parallel.constrain(v * 2, text_lib.HIDDEN_AXES))(jnp.ones((3, 4, 16)))
    assert y.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert y.addressable_shards[0].data.shape == (2, 4, 16)
    assert odd.sharding.is_fully_replicated  # 3 rows cannot split 4 ways: left whole, not an error


# ----------------------------------------------------------------------------- precision
def test_precision_config_maps_to_model_kwargs_and_names_bad_fields():
    kwargs = precision_lib.PrecisionConfig("bfloat16", "bfloat16", "save_dots").model_kwargs()
    assert kwargs == {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16, "remat": "save_dots"}
    model = nnx.eval_shape(lambda: M.Qwen2_5_VLForConditionalGeneration(CFG, rngs=nnx.Rngs(0), **kwargs))
    assert model.language_model.remat == "save_dots" and model.visual.remat == "save_dots"
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    assert precision_lib.PrecisionConfig.from_config(precision_lib.get_config()) == precision_lib.PrecisionConfig()
    with pytest.raises(ValueError, match=r"precision\.remat: 'some'"):
        precision_lib.PrecisionConfig(remat="some")
    with pytest.raises(ValueError, match=r"precision\.optimizer_dtype: unknown field"):
        precision_lib.PrecisionConfig.from_config({"optimizer_dtype": "float32"})


def test_float32_master_keeps_updates_that_bfloat16_would_round_away():
    """SGD steps of 1e-4 on weights ~1: below bf16's resolution (2^-8 relative)."""
    p0 = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    grad = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    lr, steps = 1e-4, 50
    params = jnp.asarray(p0, jnp.bfloat16)
    optimizer = precision_lib.PrecisionConfig(param_dtype="bfloat16").wrap_optimizer(optax.sgd(lr))
    state = optimizer.init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
    plain_params, plain = params, optax.sgd(lr)
    plain_state = plain.init(params)
    for _ in range(steps):
        updates, state = optimizer.update(jnp.asarray(grad, jnp.bfloat16), state, params)
        params = optax.apply_updates(params, updates)
        plain_updates, plain_state = plain.update(jnp.asarray(grad, jnp.bfloat16), plain_state, plain_params)
        plain_params = optax.apply_updates(plain_params, plain_updates)
    master = p0.copy()
    for _ in range(steps):  # SGD in float32, step by step (numpy)
        master = (master + np.float32(-lr) * grad).astype(np.float32)
    assert params.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(state.master), master, rtol=1e-7)
    assert np.all(np.abs(master - p0) > 4 * 1e-3 * np.abs(p0))  # moved several bf16 steps away
    np.testing.assert_array_equal(np.asarray(params), np.asarray(jnp.asarray(master, jnp.float32).astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(plain_params, np.float32), p0)  # plain bf16 SGD never moved
    assert precision_lib.PrecisionConfig(param_dtype="float32").wrap_optimizer(plain) is plain


# ----------------------------------------------------------------------------- memory tool
def test_memory_tool_bytes_match_the_real_shards(sharded, tmp_path, capsys):
    """The tool's numbers (from abstract shapes) against real sharded arrays and a hand formula."""
    if sharded["spec"] != "fsdp=4,tensor=2":
        pytest.skip("one mesh is enough")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    args = ["--config", str(tmp_path), "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--group-size", "2",
            "--prompt-len", "12", "--completion-len", "6", "--images", "1", "--image-size", "56",
            "--param-dtype", "float32", "--compute-dtype", "float32", "--remat", "full",
            "--device-memory-gib", "0.001"]
    plan = memory.main(args)
    out = capsys.readouterr().out
    mesh, params = sharded["mesh"], sharded["state"].params
    optimizer = make_optimizer(1e-6, 1000)  # the tool's optimizer: clip + AdamW
    opt_state = parallel.create_sharded(optimizer.init, params, mesh=mesh)
    device = mesh.devices.flat[0]

    def held_by(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

    assert plan.params == held_by(params) > 0
    assert plan.opt_state == held_by(opt_state) > 2 * plan.params  # AdamW's two moments and counters
    # about 1/8 of the unsharded model (q/k/v biases have no hidden axis: split over tensor only)
    full = sum(x.nbytes for x in jax.tree.leaves(params))
    assert full / 8 < plan.params < full / 6
    # KV cache: k and v, L x kv_heads x head_dim float32 per slot; the prompt's 12 slots once
    # per prompt (B = 8 rows), the 6 completion slots per sample (B*G = 16 rows); rows over
    # fsdp=4, kv heads over tensor=2
    t = CFG.text
    slots_per_device = (8 // 4) * 12 + (16 // 4) * 6
    assert plan.kv_cache == 2 * t.num_hidden_layers * slots_per_device * (t.num_key_value_heads // 2) * \
        t.head_dim * 4
    assert plan.temporaries > 0 and plan.step_peak >= plan.params + plan.opt_state
    assert "does not fit in 0.001 GiB per device" in out
    assert "fits in 80 GiB" in memory.format_plan(plan, 80)


def test_batch_shapes_match_a_real_batch():
    real = jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), memory.example_batch(CFG, WORKLOAD))
    abstract = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), memory.batch_shapes(CFG, WORKLOAD))
    assert real == abstract
    with pytest.raises(ValueError, match="--prompt-len"):
        memory.batch_shapes(CFG, memory.Workload(prompt_len=4, images=1, image_size=56))


@pytest.mark.slow
def test_memory_tool_7b_on_eight_devices():
    workload = memory.Workload(batch=8, group_size=8, prompt_len=1024, completion_len=1024, images=1, image_size=448)
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("fsdp=8"))
    full = memory.plan_memory(C.qwen2_5_vl_7b(), mesh, workload, precision_lib.PrecisionConfig(remat="full"))
    # 8.29e9 parameters in float32, split 8 ways; AdamW's two moments are twice that
    num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: M.init_model(C.qwen2_5_vl_7b())))))
    assert 8.2e9 < num_params < 8.4e9
    # split 8 ways, except the q/k/v and vision biases (no hidden axis to split; < 0.1%)
    assert num_params * 4 / 8 <= full.params < 1.001 * num_params * 4 / 8
    assert abs(full.opt_state - 2 * full.params) < 1024
    small = memory.plan_memory(C.qwen2_5_vl_7b(), mesh, dataclasses.replace(workload, completion_len=256),
                               precision_lib.PrecisionConfig(remat="full"))
    assert small.temporaries < full.temporaries  # activations grow with the sequence
    # the output projection in chunks of 256 positions: the [rows, 1024, vocab] float32 logits
    # of a device (8 of the 64 rows) and their softmax are no longer kept whole
    chunked = memory.plan_memory(C.qwen2_5_vl_7b(), mesh, workload, precision_lib.PrecisionConfig(remat="full"),
                                 logits_chunk=256)
    logits_bytes = 8 * workload.completion_len * C.qwen2_5_vl_7b().text.vocab_size * 4
    assert full.temporaries - chunked.temporaries > logits_bytes / 2
