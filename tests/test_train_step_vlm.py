"""The train step on VLM batches (`TrainBatch`): mini-batches split the prompts and their
completions by whole groups while every mini-batch sees all the step's images; RECAP inside
the step weights a batch with lambda that includes the batch's own signal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recap_jax import recap, sampling
from recap_jax.grpo import GRPOConfig
from recap_jax.models.qwen2_5_vl import config as C
from recap_jax.models.qwen2_5_vl import model as M
from recap_jax.tools import memory
from recap_jax.train_state import TrainState
from recap_jax.train_step import TrainBatch, make_train_step

GROUP = 2
CFG = C.tiny(vocab_size=256, text_layers=1, vision_depth=2, fullatt_block_indexes=(1,))
WORKLOAD = memory.Workload(batch=4, group_size=GROUP, prompt_len=12, completion_len=6, images=1,
                           image_size=56)


@pytest.fixture(scope="module")
def model():
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.init_model(CFG, seed=0)))
    params = jax.jit(lambda: nnx.state(M.init_model(CFG, seed=0)))()
    return graphdef, params


def as_train_batch(batch: dict) -> TrainBatch:
    rows = batch["completions"].shape[0]
    return TrainBatch(prompt=batch["prompt"], completions=batch["completions"],
                      completion_mask=batch["completion_mask"], source_id=batch["source_id"],
                      rewards=batch["rewards"], old_logprobs=batch["old_logprobs"],
                      truncated=np.zeros((rows,), bool))


def half(batch: dict, which: int) -> TrainBatch:
    """Prompts 2w, 2w+1 (their images only) and their G completions, prepared on their own."""
    prompts = slice(2 * which, 2 * which + 2)
    rows = slice(2 * which * GROUP, (2 * which + 2) * GROUP)
    per_image = WORKLOAD.patches_per_image(CFG)
    prompt = batch["prompt"]
    inputs = M.prepare_inputs(CFG, prompt.input_ids[prompts], prompt.attention_mask[prompts],
                              prompt.pixel_values[prompts.start * per_image:prompts.stop * per_image],
                              np.asarray([WORKLOAD.grid(CFG)] * 2))
    part = {k: v[rows] for k, v in batch.items() if k != "prompt"}
    return as_train_batch(dict(part, prompt=inputs))


def one_step(graphdef, params, batch, config, optimizer, **kwargs):
    step = make_train_step(config, sampling.make_logprob_fn(graphdef, GROUP), optimizer,
                           donate_state=False, **{k: v for k, v in kwargs.items()
                                                  if k == "recap"})
    state = TrainState.create(params, optimizer, jax.random.key(0), kwargs.get("recap_state"))
    return step(state, jax.tree.map(jnp.asarray, batch))


def test_vlm_minibatches_equal_the_halves_run_on_their_own(model):
    """num_minibatches=2 with lr 0: the two updates' losses and gradient norms are those of
    the two halves prepared as batches of their own (their own images only)."""
    graphdef, params = model
    batch = memory.example_batch(CFG, WORKLOAD, seed=3)
    frozen = optax.sgd(0.0)
    _, split = one_step(graphdef, params, as_train_batch(batch),
                        GRPOConfig(group_size=GROUP, num_minibatches=2,
                                   advantage_normalization="none"), frozen)
    halves = [one_step(graphdef, params, half(batch, w),
                       GRPOConfig(group_size=GROUP, advantage_normalization="none"), frozen)[1]
              for w in (0, 1)]
    np.testing.assert_allclose(split["loss"], np.mean([h["loss"] for h in halves]), rtol=1e-5)
    np.testing.assert_allclose(split["grad_norm"], np.mean([h["grad_norm"] for h in halves]),
                               rtol=1e-5)
    assert float(split["grad_norm"]) > 1e-4


def test_recap_inside_the_step_uses_this_batch_signal(model):
    """The step's lambda equals recap.update over the state's history plus this batch's
    per-objective reward means, and the returned RECAP state holds that signal."""
    graphdef, params = model
    batch = memory.example_batch(CFG, WORKLOAD, seed=4)
    config = GRPOConfig(group_size=GROUP, reward_objective_index=((0, 1),),
                        sft_objective_index=(-1,))
    rewards = np.random.default_rng(0).random((batch["rewards"].shape[0], 2)).astype(np.float32)
    batch = dict(batch, rewards=rewards)
    recap_config = recap.RecapConfig(window=2, temperature=0.05)
    state0 = recap.init(recap_config, 2)
    for signal in ([0.05, 0.9], [0.6, 0.85]):  # some history first
        state0, _ = recap.update(recap_config, state0, jnp.asarray(signal), jnp.ones(2, bool))
    new_state, metrics = one_step(graphdef, params, as_train_batch(batch), config,
                                  optax.sgd(0.0), recap=recap_config, recap_state=state0)
    expected_state, expected = recap.update(recap_config, state0, jnp.asarray(rewards.mean(0)),
                                            jnp.ones(2, bool))
    np.testing.assert_allclose(metrics["objective_weight"], expected, rtol=1e-5)
    np.testing.assert_allclose(new_state.recap_state.history, expected_state.history, rtol=1e-6)
    assert abs(float(expected[0]) - 1) > 0.05  # lambda is not trivially 1...
    assert np.abs(np.asarray(state0.weights) - np.asarray(expected)).max() > 0.01  # nor lagged
