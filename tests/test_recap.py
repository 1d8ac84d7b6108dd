"""RECAP weight update against the worked example, hand-computed values, and an independent
numpy reference (plain loops over each objective's raw history list, no ring buffer)."""

import math

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recap_jax import recap

update_jit = jax.jit(recap.update, static_argnums=0)

FORMAT = [0.2, 0.5, 0.8, 0.9, 0.95, 0.97]
ACCURACY = [0.1, 0.12, 0.08, 0.15, 0.05, 0.2]


# ----------------------------------------------------------------- independent reference


def ref_softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def ref_released(histories, directions, window, temperature, alpha):
    """recap-method.md `released`, from full raw histories (oldest first). -> (w, c, i)."""
    c, i = [], []
    for h, direction in zip(histories, directions):
        recent = h[-2 * window:]
        m = len(recent) // 2
        if m == 0:
            c.append(1.0)
            i.append(0.0)
            continue
        values = recent[len(recent) - 2 * m:]
        old, new = values[:m], values[m:]
        c.append(sum(old) / sum(new) if direction == "reward" else sum(new) / sum(old))
        mean = sum(values) / len(values)
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
        i.append(std / mean)
    seen = [k for k, h in enumerate(histories) if h]
    weights = [1.0] * len(histories)
    if seen:
        pc = ref_softmax([c[k] / temperature for k in seen])
        pi = ref_softmax([i[k] / temperature for k in seen])
        for j, k in enumerate(seen):
            weights[k] = len(seen) * (alpha * pc[j] + (1 - alpha) * pi[j])
    return weights, c, i


def ref_paper(histories, directions, upper_bounds, window, temperature, alpha, centre="window"):
    """recap-method.md `paper` (Eq. 1 on losses L = r_max - r). -> (w, c, i).

    sigma is centred on the newest window's mean (Eq. 1, centre="window") or on the mean of
    all 2W values (Algorithm 2, centre="2w")."""
    c, i, s, ready = [], [], [], []
    for k, (h, direction) in enumerate(zip(histories, directions)):
        if len(h) < 2 * window:
            c.append(1.0)
            i.append(0.0)
            s.append(alpha)
            continue
        ready.append(k)
        losses = [upper_bounds[k] - x if direction == "reward" else x for x in h[-2 * window:]]
        mu_old = sum(losses[:window]) / window
        mu = sum(losses[window:]) / window
        mean = mu if centre == "window" else sum(losses) / len(losses)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        c.append(mu_old / mu)
        i.append(sigma / (mu + mu_old))
        s.append(alpha * c[-1] + (1 - alpha) * i[-1])
    weights = [1.0] * len(histories)
    if ready:
        probs = ref_softmax([s[k] / temperature for k in ready])
        for j, k in enumerate(ready):
            weights[k] = len(ready) * probs[j]
    return weights, c, i


def run(config, signals, present):
    """Feeds [steps, K] signals/present through jitted update; per-step (w, c, i) lists."""
    state = recap.init(config, signals.shape[1])
    out = []
    for t in range(signals.shape[0]):
        state, weights = update_jit(config, state, signals[t], present[t])
        out.append((np.asarray(weights), np.asarray(state.c), np.asarray(state.i)))
    return state, out


def raw_histories(signals, present, upto):
    return [[float(signals[t, k]) for t in range(upto) if present[t, k]]
            for k in range(signals.shape[1])]


# ----------------------------------------------------------------- worked example


# `paper` with sigma centred on the current window's mean mu (Eq. 1), worked by hand from the
# recap-method.md histories (W = 3, losses L = 1 - r, sigma^2 = sum (L - mu)^2 / (2W - 1)):
#   format   L = .8 .5 .2 | .1 .05 .03: mu_old = .5, mu = .06, c = 8.333333;
#            (L - mu) = .74 .44 .14 .04 -.01 -.03, squares sum .7634, /5 = .15268,
#            sigma = .390743, i = .390743 / .56 = .697755; s = (c + i) / 2 = 4.515544
#   accuracy L = .9 .88 .92 | .85 .95 .8: mu_old = .9, mu = .866667, c = 1.038462;
#            (L - mu) = .033333 .013333 .053333 -.016667 .083333 -.066667, squares sum .0158,
#            /5 = .00316, sigma = .056214, i = .056214 / 1.766667 = .031819; s = .535140
#   lambda = 2 softmax(s / 5) = 2 sigmoid(.796081) = (1.378271, .621729)
# ("2w", Algorithm 2: the published example's i = (0.549234, 0.030094) centres on the 2W mean.)
@pytest.mark.parametrize("variant, sigma, c, i, weights", [
    ("released", "window", (0.531915, 0.750000), (0.389962, 0.416006), (0.987795, 1.012205)),
    ("paper", "2w", (8.333333, 1.038462), (0.549234, 0.030094), (1.371964, 0.628036)),
    ("paper", "window", (8.333333, 1.038462), (0.697755, 0.031819), (1.378271, 0.621729)),
])
def test_worked_example(variant, sigma, c, i, weights):
    config = recap.RecapConfig(variant=variant, window=3, temperature=5.0, alpha=0.5,
                               paper_sigma=sigma)
    signals = np.array([FORMAT, ACCURACY], np.float32).T
    state, out = run(config, signals, np.ones_like(signals, bool))
    got_w, got_c, got_i = out[-1]
    # Published figures are rounded to 6 decimals; float32 adds ~1 ulp of 8.3 (1e-6).
    np.testing.assert_allclose(got_w, weights, atol=1e-6)
    np.testing.assert_allclose(got_i, i, atol=1e-6)
    np.testing.assert_allclose(got_c, c, atol=1e-6, rtol=2e-7)


# ----------------------------------------------------------------- reference comparison


@st.composite
def trajectories(draw, max_k=4, max_window=3):
    k = draw(st.integers(1, max_k))
    window = draw(st.integers(1, max_window))
    steps = draw(st.integers(1, 6 * window + 3))  # often past 2W: ring wrap-around
    directions = tuple(draw(st.lists(st.sampled_from(recap.DIRECTIONS), min_size=k,
                                     max_size=k)))
    unit = draw(hnp.arrays(np.float64, (steps, k), elements=st.floats(0.0, 1.0)))
    present = draw(hnp.arrays(bool, (steps, k), elements=st.booleans()))
    temperature = draw(st.floats(0.3, 10.0))
    alpha = draw(st.floats(0.0, 1.0))
    return k, window, directions, unit, present, temperature, alpha


def _check_against(reference, out, signals, present):
    for t, (weights, c, i) in enumerate(out):
        ref_w, ref_c, ref_i = reference(raw_histories(signals, present, t + 1))
        np.testing.assert_allclose(c, ref_c, rtol=2e-5, atol=1e-6, err_msg=f"c, step {t}")
        np.testing.assert_allclose(i, ref_i, rtol=2e-5, atol=1e-6, err_msg=f"i, step {t}")
        np.testing.assert_allclose(weights, ref_w, rtol=2e-5, atol=1e-6,
                                   err_msg=f"weights, step {t}")


@settings(max_examples=25, deadline=None)
@given(trajectories())
def test_released_matches_reference(traj):
    k, window, directions, unit, present, temperature, alpha = traj
    # rewards in [0.05, 1], losses in [0.1, 5]: the raw formulas are well conditioned.
    is_reward = np.array([d == "reward" for d in directions])
    signals = np.where(is_reward, 0.05 + 0.95 * unit, 0.1 + 4.9 * unit).astype(np.float32)
    config = recap.RecapConfig(variant="released", window=window, temperature=temperature,
                               alpha=alpha, directions=directions)
    _, out = run(config, signals, present)
    _check_against(lambda h: ref_released(h, directions, window, temperature, alpha),
                   out, signals, present)


@settings(max_examples=25, deadline=None)
@given(trajectories(), st.lists(st.floats(1.0, 2.0), min_size=4, max_size=4))
def test_paper_matches_reference(traj, bounds):
    k, window, directions, unit, present, temperature, alpha = traj
    bounds = tuple(bounds[:k])
    # rewards in [0, 0.9] under r_max >= 1, losses in [0.1, 5]: L >= 0.1.
    is_reward = np.array([d == "reward" for d in directions])
    signals = np.where(is_reward, 0.9 * unit, 0.1 + 4.9 * unit).astype(np.float32)
    config = recap.RecapConfig(variant="paper", window=window, temperature=temperature,
                               alpha=alpha, directions=directions, reward_upper_bounds=bounds)
    _, out = run(config, signals, present)
    _check_against(lambda h: ref_paper(h, directions, bounds, window, temperature, alpha),
                   out, signals, present)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_wrap_around_with_intermittent_objectives_matches_reference(variant):
    # 15 steps with W = 2 (2W = 4): every buffer wraps several times; objective 1 is
    # absent on steps 3-6, objective 2 on odd steps.
    steps, window = 15, 2
    rng = np.random.default_rng(5)
    signals = rng.uniform(0.1, 0.9, (steps, 3)).astype(np.float32)
    present = np.ones((steps, 3), bool)
    present[3:7, 1] = False
    present[1::2, 2] = False
    directions = ("reward", "loss", "reward")
    config = recap.RecapConfig(variant=variant, window=window, temperature=0.5,
                               directions=directions)
    state, out = run(config, signals, present)
    assert state.count.tolist() == present.sum(axis=0).tolist() == [15, 11, 8]
    reference = (
        (lambda h: ref_released(h, directions, window, 0.5, 0.5)) if variant == "released"
        else (lambda h: ref_paper(h, directions, (1.0,) * 3, window, 0.5, 0.5)))
    _check_against(reference, out, signals, present)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_anneal_follows_reference_schedule(variant):
    rng = np.random.default_rng(0)
    window, max_steps, steps = 2, 7, 12
    signals = rng.uniform(0.1, 0.9, (steps, 3)).astype(np.float32)
    present = rng.uniform(size=(steps, 3)) < 0.8
    directions = ("reward", "loss", "reward")
    config = recap.RecapConfig(variant=variant, window=window, temperature=1.0,
                               alpha="anneal", max_steps=max_steps, directions=directions)
    _, out = run(config, signals, present)
    for t, (weights, _, _) in enumerate(out):
        alpha = min(max(1.0 - t / max_steps, 0.0), 1.0)  # step = updates before this one
        hist = raw_histories(signals, present, t + 1)
        ref = (ref_released(hist, directions, window, 1.0, alpha) if variant == "released"
               else ref_paper(hist, directions, (1.0,) * 3, window, 1.0, alpha))
        np.testing.assert_allclose(weights, ref[0], rtol=2e-5, atol=1e-6, err_msg=f"step {t}")


# ----------------------------------------------------------------- behaviour


def test_released_prefers_forgotten_and_volatile_objectives():
    steps = 20
    t = np.arange(steps)
    signals = np.stack([
        np.linspace(0.9, 0.5, steps),         # reward falling: being forgotten
        np.full(steps, 0.95),                 # reward saturated
        np.where(t % 2 == 0, 0.3, 0.7),       # volatile
        np.full(steps, 0.5),                  # steady
        np.linspace(1.0, 2.0, steps),         # NTP loss rising: being forgotten
        np.linspace(2.0, 1.0, steps),         # NTP loss falling: improving
    ], axis=1).astype(np.float32)
    directions = ("reward",) * 4 + ("loss",) * 2
    config = recap.RecapConfig(variant="released", window=10, directions=directions)
    _, out = run(config, signals, np.ones_like(signals, bool))
    weights = out[-1][0]
    assert weights[0] > weights[1]
    assert weights[2] > weights[3]
    assert weights[4] > weights[5]


def test_paper_warm_up_keeps_weights_at_one_until_2w_observations():
    window = 3
    rng = np.random.default_rng(1)
    signals = rng.uniform(0.1, 0.9, (10, 2)).astype(np.float32)
    present = np.ones_like(signals, bool)
    present[:3, 1] = False  # objective 1 starts 3 steps late: its warm-up ends later
    config = recap.RecapConfig(variant="paper", window=window)
    _, out = run(config, signals, present)
    for t, (weights, _, _) in enumerate(out):
        counts = present[:t + 1].sum(axis=0)
        for k in range(2):
            if counts[k] < 2 * window:
                assert weights[k] == 1.0, (t, k)
    # once both are warm the weights move, and match Eq. 1
    assert not np.allclose(out[-1][0], 1.0)
    ref = ref_paper(raw_histories(signals, present, 10), ("reward",) * 2, (1.0, 1.0),
                    window, 5.0, 0.5)
    np.testing.assert_allclose(out[-1][0], ref[0], rtol=1e-5)


def test_dwa_hand_computed():
    # Two losses and one reward; T = 2 (dwa default).
    # loss a: 2.0 -> 1.0, r = 1.0 / 2.0 = 0.5; loss b: 1.0 -> 1.5, r = 1.5;
    # reward c: 0.5 -> 0.25, r = R(t-2) / R(t-1) = 2.0.
    # lambda = 3 softmax([0.25, 0.75, 1.0]): exp = 1.284025, 2.117000, 2.718282, sum 6.119307
    #        = (3.852076, 6.351000, 8.154845) / 6.119307 = (0.629495, 1.037863, 1.332642)
    config = recap.RecapConfig(variant="dwa", directions=("loss", "loss", "reward"))
    assert config.temperature == 2.0
    signals = np.array([[2.0, 1.0, 0.5], [1.0, 1.5, 0.25]], np.float32)
    state, out = run(config, signals, np.ones_like(signals, bool))
    np.testing.assert_array_equal(out[0][0], [1.0, 1.0, 1.0])  # one observation: weights 1
    np.testing.assert_allclose(out[1][0], [0.629495, 1.037863, 1.332642], atol=1e-6)
    np.testing.assert_allclose(state.c, [0.5, 1.5, 2.0], rtol=1e-6)


def test_dwa_uses_only_the_last_two_observations_of_each_objective():
    # objective 1 is absent at the last step, so its r stays 3.0 / 1.5 = 2.0 (a loss);
    # objective 0: 4.0 -> 1.0 -> 2.0, r = 2.0 / 1.0 = 2.0. Equal r: weights (1, 1).
    config = recap.RecapConfig(variant="dwa", directions=("loss", "loss"))
    signals = np.array([[4.0, 1.5], [1.0, 3.0], [2.0, 100.0]], np.float32)
    present = np.array([[1, 1], [1, 1], [1, 0]], bool)
    state, out = run(config, signals, present)
    np.testing.assert_allclose(state.c, [2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out[-1][0], [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("static_weights", [None, (0.5, 2.0, 0.0)])
def test_static_returns_configured_weights(static_weights):
    config = recap.RecapConfig(variant="static", window=2, static_weights=static_weights)
    rng = np.random.default_rng(2)
    signals = rng.uniform(0.0, 1.0, (7, 3)).astype(np.float32)
    state, out = run(config, signals, rng.uniform(size=(7, 3)) < 0.7)
    expected = np.ones(3) if static_weights is None else np.array(static_weights)
    np.testing.assert_array_equal(recap.init(config, 3).weights, expected)
    for weights, _, _ in out:
        np.testing.assert_array_equal(weights, expected.astype(np.float32))


def test_paper_sigma_default_is_the_equation_and_is_checked():
    assert recap.RecapConfig(variant="paper").paper_sigma == "window"
    with pytest.raises(ValueError, match="paper_sigma"):
        recap.RecapConfig(variant="paper", paper_sigma="mean")


@pytest.mark.parametrize("centre", ["window", "2w"])
def test_paper_sigma_centres_match_reference(centre):
    rng = np.random.default_rng(3)
    signals = rng.uniform(0.05, 0.95, size=(9, 2)).astype(np.float32)
    config = recap.RecapConfig(variant="paper", window=3, paper_sigma=centre)
    _, out = run(config, signals, np.ones_like(signals, bool))
    histories = [list(map(float, signals[:, k])) for k in range(2)]
    ref_w, ref_c, ref_i = ref_paper(histories, ("reward",) * 2, (1.0, 1.0), 3, 5.0, 0.5, centre)
    np.testing.assert_allclose(out[-1][2], ref_i, rtol=1e-5)
    np.testing.assert_allclose(out[-1][0], ref_w, rtol=1e-5)


def test_paper_saturation_pathology():
    """L = r_max - r: as a reward saturates, mu -> 0 and c = mu_old / mu explodes, so the
    saturated objective takes almost all K of the weight (released stays near 1)."""
    steady = [0.5, 0.52, 0.48] * 2
    for top in (0.9, 0.99, 0.999):
        saturating = [0.2, 0.4, 0.6, top, top, top]
        signals = np.array([saturating, steady], np.float32).T
        paper = recap.RecapConfig(variant="paper", window=3)
        released = recap.RecapConfig(variant="released", window=3)
        _, out_p = run(paper, signals, np.ones_like(signals, bool))
        _, out_r = run(released, signals, np.ones_like(signals, bool))
        c_expected = (0.8 + 0.6 + 0.4) / 3 / (1 - top)
        np.testing.assert_allclose(out_p[-1][1][0], c_expected, rtol=1e-3)
        assert abs(out_r[-1][0][0] - 1.0) < 0.1
    assert out_p[-1][0][0] > 1.999  # c = 600 at r = 0.999: lambda ~ (K, 0)
