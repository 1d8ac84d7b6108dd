"""LoRA dropout (model.lora.dropout = p > 0): the training forward runs each targeted kernel as
x W + s (dropout_p(x) A) B (`layers.AdaptedKernel`), with masks from the train state's key.

One kernel against numpy with the mask probed out of the kernel itself (W = 0, A = B = I), and
a stacked SwiGLU under `scan_layers` against numpy with masks drawn by the documented key
schedule; the whole model: no element dropped equals the merged form, B = 0 equals the base,
p = 0 and forwards without a key are the merged path bit for bit; the train step: the same
state gives the same masks, the next state's key other masks; the mean adapter output over
many masks approaches the undropped one (and not (1 - p) times it: inverted dropout)."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recap_jax import lora, policy, sampling
from recap_jax import plan as plan_lib
from recap_jax.grpo import GRPOConfig
from recap_jax.models.qwen2_5_vl import layers
from recap_jax.tools import memory
from recap_jax.train_state import TrainState
from recap_jax.train_step import TrainBatch, make_train_step
from tests.short_run import ROOT, cli_overrides, short_config
from tests.tiny_vlm import CFG, GROUP, WORKLOAD, graphdef_and_params, prompt_and_completions


def lora_config(dropout: float) -> lora.LoraConfig:
    return lora.LoraConfig(rank=4, alpha=8.0, vision=True, dropout=dropout)


def tensordot(x: np.ndarray, kernel: np.ndarray, contract: int) -> np.ndarray:
    """x [..., *K] . kernel [*K, ...] over the K axes, in float64."""
    return np.tensordot(x.astype(np.float64), kernel.astype(np.float64), axes=contract)


# ----------------------------------------------------------------------------- one kernel

LAYOUTS = [  # (K, N, contract): an MLP kernel, q/k/v (heads on the output), o (heads contracted)
    ((6,), (5,), 1), ((6,), (2, 3), 1), ((2, 3), (6,), 2)]


def scoped(fn):
    """``fn`` traced inside `layers.adapter_scope` (as lora.wrap_logprob_fn traces the forward)."""
    def in_scope(*args):
        with layers.adapter_scope():
            return fn(*args)

    return in_scope


def probe_mask(x_shape, k_shape, key, rate) -> np.ndarray:
    """The keep mask x's matmul with a kernel of ``key`` draws, read off a kernel with W = 0,
    A = I, B = I and scale 1 (whose output is dropout(x) itself): 1 kept, 0 dropped."""
    k = int(np.prod(k_shape))
    eye = np.eye(k, dtype=np.float32)
    probe = layers.AdaptedKernel(jnp.zeros(k_shape + k_shape), jnp.asarray(eye.reshape(k_shape + (k,))),
                                 jnp.asarray(eye.reshape((k,) + k_shape)), key, 1.0, rate)
    dropped = np.asarray(jax.jit(scoped(lambda kernel: layers.matmul(jnp.ones(x_shape), kernel, len(k_shape))))(probe))
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], 1.0 / (1.0 - rate), rtol=1e-6)  # inverted dropout
    return kept.astype(np.float64)


@pytest.mark.parametrize("k_shape,n_shape,contract", LAYOUTS)
def test_one_kernel_equals_numpy_with_the_mask_on_the_adapter_input(k_shape, n_shape, contract):
    rate, scale, rank = 0.4, 2.0, 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7) + k_shape).astype(np.float32)
    w = rng.normal(size=k_shape + n_shape).astype(np.float32)
    a = rng.normal(size=k_shape + (rank,)).astype(np.float32)
    b = rng.normal(size=(rank,) + n_shape).astype(np.float32)
    key = jax.random.key(5)
    mask = probe_mask(x.shape, k_shape, key, rate)
    assert 0.25 < 1 - mask.mean() < 0.55  # about p of 84 elements dropped
    kernel = layers.AdaptedKernel(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), key, scale, rate)
    y = jax.jit(scoped(lambda kernel: layers.matmul(jnp.asarray(x), kernel, contract)))(kernel)
    dropped = x * mask / (1 - rate)
    expected = tensordot(x, w, contract) + scale * tensordot(tensordot(dropped, a, contract), b, 1)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5)
    undropped = tensordot(x, w, contract) + scale * tensordot(tensordot(x, a, contract), b, 1)
    assert np.abs(undropped - expected).max() > 1e-2  # the mask matters: the test can fail


def test_each_use_draws_its_own_mask_from_fold_in_of_the_key():
    """The n-th matmul with one kernel keeps bernoulli(fold_in(key, n), 1 - p) (the documented
    schedule: the prompts' and the completions' projections get different masks); outside an
    adapter_scope a matmul is an error, not a silently repeated mask."""
    rate, key, shape = 0.5, jax.random.key(9), (4, 8)
    eye = jnp.eye(8)
    kernel = layers.AdaptedKernel(jnp.zeros((8, 8)), eye, eye, key, 1.0, rate)

    def twice(kernel):
        x = jnp.ones(shape)
        return layers.matmul(x, kernel), layers.matmul(x, kernel)

    first, second = (np.asarray(y) != 0 for y in jax.jit(scoped(twice))(kernel))
    assert (first != second).any()
    for use, kept in enumerate((first, second)):
        drawn = jax.random.bernoulli(jax.random.fold_in(key, use), 1 - rate, shape)
        np.testing.assert_array_equal(kept, np.asarray(drawn))
    with pytest.raises(RuntimeError, match="outside layers.adapter_scope"):
        jax.jit(twice)(kernel)


def test_a_stacked_swiglu_under_scan_equals_numpy_with_per_layer_per_kernel_masks():
    """lora.with_dropout on a 2-layer stacked SwiGLU run by scan_layers: every (layer, kernel)
    has its own mask, drawn here from the documented keys: kernel k (sorted paths) of layer l
    uses split(fold_in(rng, k), L)[l], folded with its use number 0."""
    dim, hidden, stack, rate = 8, 12, 2, 0.3
    module = layers.SwiGLU(dim, hidden, use_bias=False, embed_axis="embed", mlp_axis="mlp",
                           rngs=nnx.Rngs(0), stack=stack)
    graphdef, base = nnx.split(module)
    config = lora.LoraConfig(rank=3, alpha=6.0, targets=(r"(gate|up|down)_proj/kernel$",), dropout=rate)
    adapters = lora.init_adapters(base, config, jax.random.key(1))
    adapters = {name: {"a": ab["a"], "b": ab["b"].replace(0.3 * jax.random.normal(jax.random.key(i), ab["b"].shape))}
                for i, (name, ab) in enumerate(adapters.items())}
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, dim)))
    rng = jax.random.key(7)

    def run(adapters, rng):
        adapted = nnx.merge(graphdef, lora.with_dropout(base, adapters, config, rng))
        return layers.scan_layers(adapted, lambda layer, h, _: (layer(h, jnp.float32), None), jnp.asarray(x))[0]

    y = np.asarray(jax.jit(scoped(run))(adapters, rng))
    names = sorted(adapters)  # down, gate, up
    weights = {n.split("/")[0]: (np.asarray(base[n.split("/")[0]]["kernel"][...]),
                                 np.asarray(adapters[n]["a"][...]), np.asarray(adapters[n]["b"][...]), k)
               for k, n in enumerate(names)}

    def adapted_matmul(h, name, layer):
        w, a, b, k = weights[name]
        key = jax.random.split(jax.random.fold_in(rng, k), stack)[layer]
        keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 1 - rate, h.shape))
        return tensordot(h, w[layer], 1) + config.scale * (h * keep / (1 - rate)) @ a[layer] @ b[layer]

    h = x.astype(np.float64)
    for layer in range(stack):
        gate, up = adapted_matmul(h, "gate_proj", layer), adapted_matmul(h, "up_proj", layer)
        h = adapted_matmul(gate / (1 + np.exp(-gate)) * up, "down_proj", layer)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-5)
    other = np.asarray(jax.jit(scoped(run))(adapters, jax.random.key(8)))
    assert np.abs(other - y).max() > 1e-3  # another key, other masks


def test_the_mean_over_masks_approaches_the_undropped_adapter_output():
    """E[s (dropout_p(x) A) B] = s (x A) B for inverted dropout: the mean over N = 4000 masks is
    within 5 standard errors of it at every output (Var = s^2 p / (1 - p) sum_k (x_k (AB)_kj)^2),
    and far from (1 - p) s (x A) B, what dropout without the 1 / (1 - p) scale would give."""
    rate, scale, n = 0.3, 2.0, 4000
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=(4, 5)).astype(np.float32)

    def adapter_output(key):
        kernel = layers.AdaptedKernel(jnp.zeros((6, 5)), jnp.asarray(a), jnp.asarray(b), key, scale, rate)
        return layers.matmul(jnp.asarray(x), kernel)

    outputs = np.asarray(jax.jit(jax.vmap(scoped(adapter_output)))(jax.random.split(jax.random.key(0), n)), np.float64)
    mean = outputs.mean(axis=0)
    undropped = scale * x.astype(np.float64) @ a @ b
    ab = a.astype(np.float64) @ b
    std = scale * np.sqrt(rate / (1 - rate) * ((x.astype(np.float64)[:, :, None] * ab[None]) ** 2).sum(axis=1))
    z = np.abs(mean - undropped) / (std / np.sqrt(n))
    assert z.max() < 5, z.max()
    assert (np.abs(mean - (1 - rate) * undropped) / (std / np.sqrt(n))).max() > 5
    np.testing.assert_allclose(outputs.std(axis=0), std, rtol=0.1)  # the spread is dropout's


# ----------------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def model():
    return graphdef_and_params()


@pytest.fixture(scope="module")
def batch():
    return prompt_and_completions()


def randomise_b(adapters, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
    return {name: {"a": ab["a"], "b": ab["b"].replace(0.05 * jax.random.normal(next(keys), ab["b"].shape))}
            for name, ab in adapters.items()}


def wrapped(graphdef, dropout):
    return lora.wrap_logprob_fn(sampling.make_logprob_fn(graphdef, GROUP), lora_config(dropout))


def test_whole_model_dropout_path_against_the_merged_form(model, batch):
    """With p so small that nothing is dropped (1 - p rounds to 1 in float32) the x A B path of
    every target (decoder q k v o gate up down, vision qkv proj gate up down) equals the merged
    W + s A B; with B = 0 and p = 0.5 it is the base exactly; with p = 0.5 the masks change the
    log-probs, the same key reproduces them and another key does not."""
    graphdef, base = model
    fresh = lora.init_adapters(base, lora_config(0.0), jax.random.key(0))
    params = {"base": base, "adapters": randomise_b(fresh)}
    merged = jax.jit(wrapped(graphdef, 0.0))(params, batch)[0]
    key = jax.random.key(11)
    nothing_dropped = jax.jit(wrapped(graphdef, 1e-9))(params, batch, key)[0]
    np.testing.assert_allclose(nothing_dropped, merged, rtol=1e-5, atol=1e-5)
    half = jax.jit(wrapped(graphdef, 0.5))
    base_logprobs = jax.jit(sampling.make_logprob_fn(graphdef, GROUP))(base, batch)[0]
    np.testing.assert_array_equal(half({"base": base, "adapters": fresh}, batch, key)[0], base_logprobs)
    dropped = half(params, batch, key)[0]
    assert float(jnp.abs(dropped - merged).max()) > 1e-3
    np.testing.assert_array_equal(half(params, batch, key)[0], dropped)
    assert float(jnp.abs(half(params, batch, jax.random.key(12))[0] - dropped).max()) > 1e-3


def test_the_decoder_draws_two_masks_per_kernel_the_vision_tower_one(model, batch):
    """The decoder runs each projection on the prompts, then on the completions
    (`with_shared_prefix`), a module reads a fresh copy of its kernel at every access: the
    scope still counts two uses of each decoder kernel (masks 0 and 1), one of each vision
    kernel, so no two calls share a mask."""
    graphdef, base = model
    config = lora_config(0.5)
    adapters = lora.init_adapters(base, config, jax.random.key(0))
    forward = sampling.make_logprob_fn(graphdef, GROUP)
    with layers.adapter_scope() as uses:
        jax.eval_shape(lambda p: forward(lora.with_dropout(p, adapters, config, jax.random.key(1)), batch), base)
    assert sorted(count for _, count in uses.values()) == [1] * 5 + [2] * 7


def test_without_a_key_or_with_p_zero_it_is_the_merged_path_bit_for_bit(model, batch):
    """Inference (no key: sampling, evaluation, pre-update and reference log-probs) merges the
    adapters whatever p; p = 0 ignores a key: both are exactly today's merged path."""
    graphdef, base = model
    config = lora_config(0.0)
    adapters = randomise_b(lora.init_adapters(base, config, jax.random.key(0)))
    params = {"base": base, "adapters": adapters}
    merged = jax.jit(sampling.make_logprob_fn(graphdef, GROUP))(lora.merge(base, adapters, config), batch)[0]
    np.testing.assert_array_equal(jax.jit(wrapped(graphdef, 0.0))(params, batch, jax.random.key(3))[0], merged)
    np.testing.assert_array_equal(jax.jit(wrapped(graphdef, 0.5))(params, batch)[0], merged)


# ----------------------------------------------------------------------------- train step


def _train_batch(seed=2):
    b = memory.example_batch(CFG, WORKLOAD, seed=seed)
    rows = b["completions"].shape[0]
    return jax.tree.map(jnp.asarray, TrainBatch(
        prompt=b["prompt"], completions=b["completions"], completion_mask=b["completion_mask"],
        source_id=b["source_id"], rewards=b["rewards"], old_logprobs=b["old_logprobs"],
        truncated=np.zeros((rows,), bool)))


def _step(graphdef, dropout, logprob_rng):
    optimizer = lora.adapter_optimizer(optax.adam(1e-2))
    step = make_train_step(GRPOConfig(group_size=GROUP), wrapped(graphdef, dropout), optimizer,
                           donate_state=False, frozen_key="base", logprob_rng=logprob_rng)
    return step, optimizer


def test_train_step_masks_follow_the_state_key(model):
    """The step is a function of the state: the same state (a resume restores the key) gives
    bit-identical adapters and loss; the next step's key (the state's new rng) draws other
    masks, so the same params and batch then give another loss and update."""
    graphdef, base = model
    params = {"base": base, "adapters": randomise_b(lora.init_adapters(base, lora_config(0.3), jax.random.key(0)))}
    step, optimizer = _step(graphdef, 0.3, logprob_rng=True)
    batch = _train_batch()
    state = TrainState.create(params, optimizer, jax.random.key(0))
    first, first_metrics = step(state, batch)
    again, again_metrics = step(state, batch)
    assert float(first_metrics["grad_norm"]) > 0
    np.testing.assert_array_equal(again_metrics["loss"], first_metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, again.params["adapters"], first.params["adapters"])
    next_key = state.replace(rng=first.rng)  # same params, the following step's key
    other, other_metrics = step(next_key, batch)
    assert float(jnp.abs(other_metrics["loss"] - first_metrics["loss"])) > 1e-6
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in
               zip(jax.tree.leaves(other.params["adapters"]), jax.tree.leaves(first.params["adapters"])))
    jax.tree.map(np.testing.assert_array_equal, first.params["base"], base)


def test_p_zero_steps_identically_with_or_without_a_forward_key(model):
    """p = 0 ignores the forward key: the update equals the merged-path step's (train.py does
    not even ask for a key at p = 0)."""
    graphdef, base = model
    params = {"base": base, "adapters": randomise_b(lora.init_adapters(base, lora_config(0.0), jax.random.key(0)))}
    batch = _train_batch()
    results = []
    for logprob_rng in (False, True):
        step, optimizer = _step(graphdef, 0.0, logprob_rng)
        results.append(step(TrainState.create(params, optimizer, jax.random.key(0)), batch))
    (plain, plain_metrics), (keyed, keyed_metrics) = results
    np.testing.assert_array_equal(keyed_metrics["loss"], plain_metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, keyed.params["adapters"], plain.params["adapters"])


# ----------------------------------------------------------------------------- the run

RUN = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.1,
       "sft.steps": 4, "rl.steps": 2, "checkpoint.every_steps": 2, "eval.num_examples": 0}


def launch(workdir, **extra) -> None:
    """``python -m recap_jax.train`` on the short demo run with LoRA (rank 4, dropout 0.1)."""
    command = [sys.executable, "-m", "recap_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
               "--workdir", str(workdir), *cli_overrides({**RUN, **extra})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


def restart_from_step_2(source, target) -> None:
    """A copy of a finished run's workdir that resumes from its SFT step-2 checkpoint."""
    shutil.copytree(source, target)
    for name in ("warmstart", "final", "checkpoints/4", "checkpoints/6"):
        shutil.rmtree(target / name)


@pytest.mark.slow
def test_a_lora_dropout_run_trains_only_the_adapters_and_resumes_to_the_same_weights(tmp_path):
    """The CLI run (SFT 4 steps, then RL 2 steps) with model.lora.dropout=0.1: warmstart/ and
    final/ move only the targeted kernels; restarted from the step-2 checkpoint it ends with
    the same warmstart/ and final/ bit for bit (the masks come from the checkpointed key);
    restarted with dropout 0 the SFT steps 3 and 4 end elsewhere (dropout was on in the run)."""
    from tests.test_lora_run import assert_only_targets_moved, initial_params, leaves_by_path

    run = tmp_path / "run"
    launch(run)
    config = short_config(**{k.replace(".", "__"): v for k, v in RUN.items()})
    plan = plan_lib.build_plan(config)
    warmstart = policy.load_params(plan, str(run / "warmstart"))
    final = policy.load_params(plan, str(run / "final"))
    assert_only_targets_moved(initial_params(plan), warmstart, plan.model.lora)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)

    resumed = tmp_path / "resumed"
    restart_from_step_2(run, resumed)
    launch(resumed)
    for name, value in leaves_by_path(policy.load_params(plan, str(resumed / "warmstart"))).items():
        np.testing.assert_array_equal(value, leaves_by_path(warmstart)[name], err_msg=name)
    for name, value in leaves_by_path(policy.load_params(plan, str(resumed / "final"))).items():
        np.testing.assert_array_equal(value, leaves_by_path(final)[name], err_msg=name)

    undropped = tmp_path / "undropped"
    restart_from_step_2(run, undropped)
    launch(undropped, **{"model.lora.dropout": 0.0, "rl.steps": 0})
    other = leaves_by_path(policy.load_params(plan, str(undropped / "warmstart")))
    assert any(not np.array_equal(value, other[name]) for name, value in leaves_by_path(warmstart).items())
