"""LoRA adapters next to the frozen base params, and the frozen vision tower, on a tiny random
Qwen2.5-VL: zero-initialised adapters leave the policy unchanged, only adapters get gradients
and optimizer state, the merged export equals the adapted model, adapters are sharded like
their kernels, parameter counts by hand; freeze_vision zeroes the tower's gradients and
removes its backward matmuls from the compiled train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recap_jax import freeze, lora, parallel, sampling
from recap_jax.grpo import GRPOConfig
from recap_jax.models.qwen2_5_vl import model as M
from recap_jax.tools import memory
from recap_jax.train_state import TrainState
from recap_jax.train_step import TrainBatch, make_train_step
from tests.tiny_vlm import CFG, GROUP, WORKLOAD, graphdef_and_params, prompt_and_completions

LORA = lora.LoraConfig(rank=4, alpha=8.0, vision=True)


@pytest.fixture(scope="module")
def model():
    return graphdef_and_params()


@pytest.fixture(scope="module")
def batch():
    return prompt_and_completions()


def randomise_b(adapters, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(adapters)))
    return {name: {"a": ab["a"], "b": ab["b"].replace(0.05 * jax.random.normal(next(keys), ab["b"].shape))}
            for name, ab in adapters.items()}


def logprobs(graphdef, params, batch):
    return jax.jit(sampling.make_logprob_fn(graphdef, GROUP))(params, batch)[0]


def adapted_fn(graphdef, config=LORA):
    return jax.jit(lora.wrap_logprob_fn(sampling.make_logprob_fn(graphdef, GROUP), config))


def test_zero_initialised_adapters_leave_the_policy_unchanged(model, batch):
    graphdef, base = model
    adapters = lora.init_adapters(base, LORA, jax.random.key(0))
    assert len(adapters) == 7 + 5  # decoder q k v o gate up down; vision qkv proj gate up down
    adapted = adapted_fn(graphdef)
    np.testing.assert_array_equal(adapted({"base": base, "adapters": adapters}, batch)[0],
                                  logprobs(graphdef, base, batch))
    moved = adapted({"base": base, "adapters": randomise_b(adapters)}, batch)[0]
    assert float(jnp.abs(moved - logprobs(graphdef, base, batch)).max()) > 1e-4  # it can fail


def test_only_adapters_get_gradients_and_optimizer_state(model, batch):
    graphdef, base = model
    adapters = lora.init_adapters(base, LORA, jax.random.key(0))
    fn = lora.wrap_logprob_fn(sampling.make_logprob_fn(graphdef, GROUP), LORA)
    loss = lambda p: (fn(p, batch)[0] * batch["completion_mask"]).sum()  # noqa: E731
    params = {"base": base, "adapters": adapters}
    grad_fn = jax.jit(jax.grad(loss))
    grads = grad_fn(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["base"]))
    for name, g in grads["adapters"].items():  # B = 0: dL/dA = 0, dL/dB = s A^T dL/dW'
        assert float(jnp.abs(g["b"][...]).max()) > 0, name
        assert float(jnp.abs(g["a"][...]).max()) == 0, name
    moved = dict(params, adapters=randomise_b(adapters))
    grads = grad_fn(moved)
    assert all(float(jnp.abs(g["a"][...]).max()) > 0 for g in grads["adapters"].values())
    optimizer = lora.adapter_optimizer(optax.adam(1e-2))
    state = optimizer.init(moved)
    counts = lora.count_params(base, LORA)
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * counts["adapter"]  # Adam's two moments, adapters only
    updates, _ = optimizer.update(grads, state, moved)
    new = optax.apply_updates(moved, updates)
    jax.tree.map(np.testing.assert_array_equal, new["base"], base)
    assert any(float(jnp.abs(n - o).max()) > 0 for n, o in
               zip(jax.tree.leaves(new["adapters"]), jax.tree.leaves(moved["adapters"])))


def test_merged_export_equals_the_adapted_model(model, batch):
    graphdef, base = model
    adapters = randomise_b(lora.init_adapters(base, LORA, jax.random.key(3)), seed=4)
    adapted = adapted_fn(graphdef)({"base": base, "adapters": adapters}, batch)[0]
    exported = lora.merge_into_base(base, adapters, LORA)
    np.testing.assert_allclose(logprobs(graphdef, exported, batch), adapted, rtol=1e-5, atol=1e-5)
    # W' = W + (alpha / r) A B by hand for one stacked kernel with heads on the output
    name = "language_model/layers/self_attn/q_proj/kernel"
    a, b = np.asarray(adapters[name]["a"][...]), np.asarray(adapters[name]["b"][...])
    w = np.asarray(base["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][...])
    expected = w + 2.0 * np.einsum("lkr,lrn->lkn", a, b.reshape(1, 4, -1)).reshape(w.shape)
    np.testing.assert_allclose(exported["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][...],
                               expected, rtol=1e-5, atol=1e-6)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    assert jax.tree.leaves(lora.merge_into_base(bf16, adapters, LORA))[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(lora.merge(base, adapters, LORA, jnp.bfloat16))[0].dtype == jnp.float32
    merged = lora.merge(base, adapters, LORA, jnp.bfloat16)
    assert merged["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...].dtype == jnp.bfloat16


def test_parameter_counts_by_hand(model):
    """Per decoder layer (hidden 64, 4 x 16 query heads, 2 x 16 kv heads, mlp 128), rank r:
    q r(64 + 64), k and v r(64 + 32), o r(64 + 64), gate and up r(64 + 128), down r(128 + 64)
    = 1024 r; vision (2 blocks, hidden 32, 2 x 16 heads, mlp 64): qkv r(32 + 96), proj
    r(32 + 32), gate, up, down r(32 + 64) each = 480 r per block."""
    _, base = model
    decoder = lora.count_params(base, lora.LoraConfig(rank=4))
    assert decoder["adapter"] == 1024 * 4
    assert decoder["base"] == sum(x.size for x in jax.tree.leaves(base))
    assert decoder["targeted"] == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    both = lora.count_params(base, LORA)
    assert both["adapter"] == 1024 * 4 + 2 * 480 * 4
    adapters = lora.init_adapters(base, LORA, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(adapters)) == both["adapter"]
    abstract = nnx.state(nnx.eval_shape(lambda: M.init_model(CFG, seed=0)))
    assert lora.count_params(abstract, LORA) == both


def test_adapters_are_sharded_like_their_kernels(model):
    _, base = model
    adapters = lora.init_adapters(base, LORA, jax.random.key(0))
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    specs = parallel.tree_shardings(adapters, mesh)
    kernels = parallel.tree_shardings(base, mesh)
    q = specs["language_model/layers/self_attn/q_proj/kernel"]
    assert q["a"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert q["b"].get_value().spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert kernels["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value().spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    o = specs["language_model/layers/self_attn/o_proj/kernel"]
    assert o["a"].get_value().spec == jax.sharding.PartitionSpec(None, "tensor")
    assert o["b"].get_value().spec == jax.sharding.PartitionSpec(None, None, "fsdp")


def _train_batch(seed=2):
    b = memory.example_batch(CFG, WORKLOAD, seed=seed)
    rows = b["completions"].shape[0]
    return jax.tree.map(jnp.asarray, TrainBatch(
        prompt=b["prompt"], completions=b["completions"], completion_mask=b["completion_mask"],
        source_id=b["source_id"], rewards=b["rewards"], old_logprobs=b["old_logprobs"],
        truncated=np.zeros((rows,), bool)))


def test_a_frozen_base_key_gives_the_same_update_without_carrying_the_base(model):
    """make_train_step(frozen_key="base"): the base is a constant of the step, yet the new
    adapters, optimizer state and loss equal those of differentiating the whole dict (whose
    base gets zero gradient and zero update); the base comes back unchanged."""
    graphdef, base = model
    adapters = randomise_b(lora.init_adapters(base, LORA, jax.random.key(0)))
    params = {"base": base, "adapters": adapters}
    fn = lora.wrap_logprob_fn(sampling.make_logprob_fn(graphdef, GROUP), LORA)
    optimizer = lora.adapter_optimizer(optax.adam(1e-2))
    batch = _train_batch()
    results = {}
    for key in (None, "base"):
        state = TrainState.create(params, optimizer, jax.random.key(0))
        step = make_train_step(GRPOConfig(group_size=GROUP), fn, optimizer, donate_state=False,
                               frozen_key=key)
        results[key] = step(state, batch)
    (whole, whole_metrics), (frozen, frozen_metrics) = results[None], results["base"]
    assert float(frozen_metrics["grad_norm"]) > 0
    np.testing.assert_allclose(frozen_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 frozen.params["adapters"], whole.params["adapters"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 frozen.opt_state, whole.opt_state)
    jax.tree.map(np.testing.assert_array_equal, frozen.params["base"], base)
    assert any(float(jnp.abs(n - o).max()) > 0 for n, o in
               zip(jax.tree.leaves(frozen.params["adapters"]), jax.tree.leaves(adapters)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), r"model\.lora\.rank=0"), (dict(alpha=-1.0), r"model\.lora\.alpha=-1\.0"),
    (dict(dropout=1.0), r"model\.lora\.dropout=1\.0.*\[0, 1\)"),
    (dict(dropout=-0.1), r"model\.lora\.dropout=-0\.1"),
    (dict(targets="q_proj"), r"model\.lora\.targets='q_proj'"),
    (dict(targets=("(",)), r"model\.lora\.targets='\('"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kwargs)


def test_a_target_matching_nothing_is_an_error(model):
    _, base = model
    with pytest.raises(ValueError, match=r"targets: pattern\(s\) \['q_prj'\] match no parameter"):
        lora.init_adapters(base, lora.LoraConfig(targets=("q_prj",)), jax.random.key(0))


# --------------------------------------------------------------------------- freeze_vision


def _dot_count(hlo: str) -> int:
    return len(re.findall(r"\bdot\(", hlo))


def test_freeze_vision_zero_gradients_and_no_tower_backward(model, batch):
    graphdef, params = model
    fn = sampling.make_logprob_fn(graphdef, GROUP)
    frozen = freeze.freeze_vision(fn)
    loss = lambda f: lambda p: (f(p, batch)[0] * batch["completion_mask"]).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss(frozen)))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = freeze.param_path(path)
        if re.search(freeze.VISION_TOWER, name):
            assert float(jnp.abs(g).max()) == 0.0, name
    assert float(jnp.abs(grads["visual"]["merger"]["mlp_0"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...]).max()) > 0

    train_batch = _train_batch()
    config = GRPOConfig(group_size=GROUP)
    counts = {}
    for name, policy in (("trained", fn), ("frozen", frozen)):
        optimizer = optax.sgd(0.1)
        if name == "frozen":
            optimizer = freeze.frozen_optimizer(optimizer, params, (freeze.VISION_TOWER,))
        state = TrainState.create(params, optimizer, jax.random.key(0))
        step = make_train_step(config, policy, optimizer, donate_state=False)
        counts[name] = _dot_count(step.lower(state, train_batch).compile().as_text())
        if name == "frozen":
            new_state, _ = step(state, train_batch)
            np.testing.assert_array_equal(new_state.params["visual"]["blocks"]["attn"]["qkv"]["kernel"][...],
                                          params["visual"]["blocks"]["attn"]["qkv"]["kernel"][...])
    # the tower's blocks and patch embedding: 2 x (qkv, proj, gate, up, down) + 1 matmuls and
    # their attention; forward only when frozen (no dW and no dx matmuls): 98 -> 79 dots here
    assert counts["frozen"] < counts["trained"], counts


def test_freeze_patterns_must_match(model):
    _, params = model
    with pytest.raises(ValueError, match=r"pattern\(s\) \['\^vision/'\] match no parameter"):
        freeze.path_labels(params, ("^vision/",))
