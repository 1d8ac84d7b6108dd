"""The RL stage's rollout options, wired from the config: per-source rewards named by import
path, per-source completion limits and stop strings (the mask cut after sampling), DAPO's
dynamic sampling, and the entropy bonus, by hand and in one short run."""

import dataclasses

import numpy as np
import pytest

from recap_jax import plan as plan_lib
from recap_jax import rollout, train
from recap_jax.metrics_log import read_jsonl
from recap_jax.run_config import ConfigError
from tests.short_run import short_config

PIECES = {0: "", 1: "a", 2: "</ans", 3: "wer>", 4: "b", 9: ""}  # 0: EOS, 9: padding
FIX = "tests.reward_fixtures:"


def decode(ids):
    return "".join(PIECES[int(i)] for i in ids)


# --------------------------------------------------------------------------- the mask


def test_finish_rows_cuts_mask_tokens_and_logprobs_by_hand():
    """Row 0: the stop string is complete at token 3 -> 3 tokens, not truncated. Row 1: no
    stop, 5 tokens > the source's limit 4 -> 4 tokens, truncated. Row 2: EOS after 2 tokens,
    untouched. Past the new end: padding id 9, log-prob 0, mask 0."""
    tokens = np.array([[1, 2, 3, 4, 4], [1, 4, 4, 4, 4], [4, 0, 9, 9, 9]])
    lengths, truncated = np.array([5, 5, 2]), np.array([True, True, False])
    logprobs = -np.arange(1, 16, dtype=np.float32).reshape(3, 5) / 10
    rows = rollout.finish_rows(tokens, lengths, truncated, logprobs, decode, pad_id=9,
                               stop=("</answer>",), max_new_tokens=4)
    np.testing.assert_array_equal(rows["completion_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                                            [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["completions"], [[1, 2, 3, 9, 9], [1, 4, 4, 4, 9],
                                                        [4, 0, 9, 9, 9]])
    np.testing.assert_allclose(rows["old_logprobs"], [[-.1, -.2, -.3, 0, 0], [-.6, -.7, -.8, -.9, 0],
                                                      [-1.1, -1.2, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(rows["truncated"], [False, True, False])
    np.testing.assert_array_equal(rows["lengths"], [3, 4, 2])
    assert list(rows["text"]) == ["a</answer>", "abbb", "b"]


def test_finish_rows_without_options_keeps_the_sampler_output():
    tokens = np.array([[1, 2, 3, 4, 4], [4, 0, 9, 9, 9]])
    logprobs = np.full((2, 5), -0.5, np.float32) * (np.arange(5) < [[5], [2]])
    rows = rollout.finish_rows(tokens, np.array([5, 2]), np.array([True, False]), logprobs,
                               decode, pad_id=9, max_new_tokens=5)  # = the sampler's length
    np.testing.assert_array_equal(rows["completions"], tokens)
    np.testing.assert_array_equal(rows["completion_mask"], [[1] * 5, [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["old_logprobs"], logprobs)
    np.testing.assert_array_equal(rows["truncated"], [True, False])


def test_take_prompt_rows_repeats_per_prompt_arrays_only():
    batch = {"input_ids": np.arange(6).reshape(3, 2), "answer": np.array(["x", "y", "z"]),
             "shared": np.zeros((5, 2))}
    out = rollout.take_prompt_rows(batch, np.array([2, 0, 2]))
    np.testing.assert_array_equal(out["input_ids"], [[4, 5], [0, 1], [4, 5]])
    assert list(out["answer"]) == ["z", "x", "z"]
    assert out["shared"] is batch["shared"]


# --------------------------------------------------------------------------- the config


def _plan(**overrides):
    return plan_lib.build_plan(short_config(**overrides))


def test_import_path_rewards_become_the_sources_objectives():
    plan = _plan(data__sources__reasoning__rewards=f"{FIX}length_reward, accuracy")
    rl = plan.stage("rl")
    assert rl.objectives.sources[0].rewards == (f"{FIX}length_reward", "accuracy")
    assert f"reasoning/{FIX}length_reward" in rl.objectives.names
    assert not plan_lib.unread_fields(short_config())


@pytest.mark.parametrize("rewards,match", [
    ("no_such_module_xyz:fn", r"config\.data\.sources\.reasoning\.rewards=.*cannot import "
                              r"module 'no_such_module_xyz'"),
    (f"{FIX}missing", r"config\.data\.sources\.reasoning\.rewards=.*has no attribute 'missing'"),
    (f"{FIX}NOT_CALLABLE", r"config\.data\.sources\.reasoning\.rewards=.*is a int, not a function"),
    ("no_such_reward", r"config\.data\.sources\.reasoning\.rewards=.*unknown reward"),
    ("accuracy,accuracy", r"config\.data\.sources\.reasoning\.rewards=.*distinct"),
])
def test_bad_reward_paths_fail_at_start_naming_the_field(rewards, match):
    with pytest.raises(ConfigError, match=match):
        _plan(data__sources__reasoning__rewards=rewards)


@pytest.mark.parametrize("overrides,match", [
    ({"data__sources__ocr__rewards": "accuracy"}, r"config\.data\.sources\.ocr\.rewards.*SFT task"),
    ({"data__sources__reasoning__max_new_tokens": 9},
     r"config\.data\.sources\.reasoning\.max_new_tokens=9.*<= rl\.max_new_tokens=8"),
    ({"data__sources__reasoning__max_new_tokens": 3, "rl__overlong_buffer": 4},
     r"config\.data\.sources\.reasoning\.max_new_tokens=3: .*overlong_buffer=4"),
    ({"data__sources__reasoning__stop_strings": ("</answer>", "")},
     r"config\.data\.sources\.reasoning\.stop_strings"),
    ({"rl__entropy_coef": -0.1}, r"config\.rl\.entropy_coef=-0\.1"),
    ({"rl__dynamic_sampling_extra_draws": -1}, r"config\.rl\.dynamic_sampling_extra_draws=-1"),
])
def test_bad_rollout_options_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _plan(**overrides)


def test_source_limit_is_the_loss_l_max_and_stop_strings_reach_the_stage():
    plan = _plan(data__sources__grounding__max_new_tokens=4, rl__overlong_buffer=2,
                 data__sources__grounding__stop_strings=("</answer>",))
    rl = plan.stage("rl")
    assert rl.completion_limit("grounding") == 4 and rl.completion_limit("reasoning") == 8
    assert rl.source_grpo("grounding").max_completion_length == 4
    assert rl.source_grpo("reasoning") is rl.grpo and rl.grpo.max_completion_length == 8
    assert rl.stop_strings("grounding") == ("</answer>",) and rl.stop_strings("reasoning") == ()
    assert dataclasses.replace(rl.grpo, max_completion_length=4) == rl.source_grpo("grounding")


def test_options_are_off_by_default_in_the_paper_configs():
    from tests.short_run import load_config

    for name in ("hybrid_7b", "rlvr_only_3b"):
        config = load_config(name)
        assert config.rl.entropy_coef == 0 and config.rl.dynamic_sampling_extra_draws == 0
        for source in config.data.sources.values():
            assert (source.rewards, source.max_new_tokens, tuple(source.stop_strings)) == ("", 0, ())


# --------------------------------------------------------------------------- a short run


@pytest.mark.slow
def test_short_run_with_every_option(tmp_path):
    """RL only (no warm-start), B = 2 prompts x G = 2. Reasoning is scored by a constant reward
    named by import path: every group has equal rewards, so dynamic sampling with 2 extra draws
    drops them all and fills the batch back with them: draws 3, resampled 2 x 2 = 4, dropped
    3 x 2 - 2 = 4, filled 2, surplus 0 on every reasoning step. A = 0 there, so the only
    gradient is the entropy bonus's (grad_norm > 0, loss = -alpha H < 0). Grounding's
    completions are cut to its own limit of 3 tokens."""
    config = short_config(sft__steps=0, rl__method="uniform", rl__entropy_coef=0.5,
                          rl__dynamic_sampling_extra_draws=2, eval__num_examples=2,
                          data__sources__reasoning__rewards=f"{FIX}constant_reward",
                          data__sources__grounding__max_new_tokens=3,
                          data__sources__grounding__stop_strings=("</answer>",))
    train.train(config, str(tmp_path))
    lines = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl"))[0] if r["stage"] == "rl"]
    reasoning = [r for r in lines if r["source"] == "reasoning"]
    grounding = [r for r in lines if r["source"] == "grounding"]
    assert reasoning and grounding
    for line in reasoning:
        assert line[f"reward/reasoning/{FIX}constant_reward"] == pytest.approx(0.5)
        assert (line["dynamic_sampling/draws"], line["dynamic_sampling/resampled"],
                line["dynamic_sampling/dropped"], line["dynamic_sampling/filled_zero_variance"],
                line["dynamic_sampling/surplus"]) == (3, 4, 4, 2, 0)
        assert line["grad_norm"] > 0 and line["loss"] < 0
    for line in grounding:
        assert line["completion_length_mean"] <= 3
        assert "dynamic_sampling/draws" in line
