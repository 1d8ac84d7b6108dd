"""Dynamic sampling (DAPO, Yu et al. 2025) on the host, without changing the step's shapes.

A GRPO group whose G rewards are all equal has advantage 0 on every row: it costs a forward
and backward pass and gives no policy gradient. DAPO over-samples and keeps only groups with
0 < accuracy < 1. Here, with a fixed batch of N groups (the jitted step compiles once):

    batch, stats = fill_batch(draw, num_groups=N, group_size=G, max_extra_draws=2)

``draw()`` samples and scores one round of prompts (always the same number of groups, so
the sampler does not recompile) and returns `ScoredGroups`; `fill_batch` keeps the groups
whose rewards vary, draws again while fewer than N are kept and the budget of extra draws
lasts, and fills the slots still empty with zero-variance groups (in draw order), so the
result always holds exactly N groups. `DynamicSamplingStats` counts what was dropped and
resampled (log them per step). Apply it to RL batches only: an SFT group's "rewards" carry
no signal.

Which rewards count: a group is informative if any of the chosen reward columns varies
within it (all columns by default; columns a source lacks may hold nan and never vary). In
RECAP's `reward` mode R = sum_f lambda_f r_f varies only if some column does; pass
``columns=(0,)`` to follow DAPO's accuracy-only rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["DynamicSamplingStats", "ScoredGroups", "concatenate", "fill_batch",
           "informative_groups", "take_groups"]

_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class ScoredGroups:
    """n groups of G scored completions, host numpy, group-major (row g G + j: sample j of
    group g).

    rewards: [n G, F] (or [n G]) raw reward components.
    rows: per-completion arrays, each with n G rows first (tokens, masks, log-probs, ...).
    groups: per-prompt arrays, each with n rows first (the replay records' fields, prompt
      token ids, ...), from which the loop rebuilds the prompts' model inputs.
    """

    rewards: np.ndarray
    rows: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    groups: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def num_groups(self, group_size: int) -> int:
        rows = np.shape(self.rewards)[0]
        if rows % group_size:
            raise ValueError(f"ScoredGroups.rewards has {rows} rows, not a multiple of the group "
                             f"size G={group_size}")
        n = rows // group_size
        for kind, arrays, expected in (("rows", self.rows, rows), ("groups", self.groups, n)):
            for name, value in arrays.items():
                if np.shape(value)[:1] != (expected,):
                    raise ValueError(f"ScoredGroups.{kind}[{name!r}] has shape {np.shape(value)}; "
                                     f"expected {expected} rows first ({n} groups of G={group_size})")
        return n


@dataclasses.dataclass(frozen=True)
class DynamicSamplingStats:
    """What one `fill_batch` call did (all counts in groups).

    draws: rounds sampled (1 + extra draws); resampled: groups drawn after the first round;
    dropped: zero-variance groups left out of the batch; filled_zero_variance: zero-variance
    groups kept because the budget ran out before N informative ones were found; surplus:
    informative groups drawn beyond N (sampled, not trained on).
    """

    draws: int
    resampled: int
    dropped: int
    filled_zero_variance: int
    surplus: int

    def as_metrics(self, prefix: str = "dynamic_sampling/") -> dict[str, int]:
        return {prefix + name: value for name, value in dataclasses.asdict(self).items()}


def informative_groups(rewards: np.ndarray, group_size: int,
                       columns: Sequence[int] | None = None) -> np.ndarray:
    """[n] bool: True where some chosen reward column varies within the group (max - min
    above 1e-6, nan ignored; an all-nan column never varies)."""
    r = np.asarray(rewards, np.float64)
    r = r.reshape(r.shape[0], -1)
    if columns is not None:
        bad = [c for c in columns if not -r.shape[1] <= c < r.shape[1]]
        if bad:
            raise ValueError(f"dynamic sampling: columns={tuple(columns)} name reward columns "
                             f"{bad} outside the {r.shape[1]} given")
        r = r[:, list(columns)]
    if r.shape[0] % group_size:
        raise ValueError(f"dynamic sampling: {r.shape[0]} reward rows are not a multiple of the "
                         f"group size G={group_size}")
    grouped = r.reshape(-1, group_size, r.shape[1])
    finite = ~np.isnan(grouped)
    high = np.where(finite, grouped, -np.inf).max(axis=1)
    low = np.where(finite, grouped, np.inf).min(axis=1)
    spread = np.where(finite.any(axis=1), high - low, 0.0)
    return (spread > _TOLERANCE).any(axis=1)


def take_groups(scored: ScoredGroups, index: Sequence[int], group_size: int) -> ScoredGroups:
    """The groups ``index`` (in that order) of ``scored``."""
    index = np.asarray(index, np.int64).reshape(-1)
    row_index = (index[:, None] * group_size + np.arange(group_size)).reshape(-1)
    return ScoredGroups(rewards=np.asarray(scored.rewards)[row_index],
                        rows={k: np.asarray(v)[row_index] for k, v in scored.rows.items()},
                        groups={k: np.asarray(v)[index] for k, v in scored.groups.items()})


def concatenate(parts: Sequence[ScoredGroups]) -> ScoredGroups:
    """One ScoredGroups of ``parts`` in order (the same fields in each)."""
    first = parts[0]
    for part in parts[1:]:
        if set(part.rows) != set(first.rows) or set(part.groups) != set(first.groups):
            raise ValueError("dynamic sampling: draws return different fields: "
                             f"{sorted(first.rows)} / {sorted(first.groups)} vs "
                             f"{sorted(part.rows)} / {sorted(part.groups)}")
    return ScoredGroups(rewards=np.concatenate([np.asarray(p.rewards) for p in parts]),
                        rows={k: np.concatenate([np.asarray(p.rows[k]) for p in parts])
                              for k in first.rows},
                        groups={k: np.concatenate([np.asarray(p.groups[k]) for p in parts])
                                for k in first.groups})


def _choose(informative: np.ndarray, num_groups: int) -> tuple[np.ndarray, int]:
    """Indices of the first N informative groups, then zero-variance ones to fill; and how
    many of the latter were used."""
    good = np.flatnonzero(informative)[:num_groups]
    filler = np.flatnonzero(~informative)[:num_groups - len(good)]
    if len(good) + len(filler) < num_groups:
        raise ValueError(f"dynamic sampling: {len(informative)} groups drawn cannot fill "
                         f"num_groups={num_groups}")
    return np.concatenate([good, filler]), len(filler)


def fill_batch(draw: Callable[[], ScoredGroups], num_groups: int, group_size: int,
               max_extra_draws: int, columns: Sequence[int] | None = None
               ) -> tuple[ScoredGroups, DynamicSamplingStats]:
    """Exactly ``num_groups`` groups: informative ones first (draw order), drawing up to
    ``max_extra_draws`` more rounds while fewer than N are informative, then zero-variance
    groups as filler. ``max_extra_draws=0`` keeps the first draw's groups, reordered
    informative first, when it holds N groups."""
    for name, value, low in (("num_groups", num_groups, 1), ("group_size", group_size, 1),
                             ("max_extra_draws", max_extra_draws, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"dynamic sampling: {name}={value!r}; expected an int >= {low}")
    parts, flags = [], []
    while True:
        part = draw()
        if not isinstance(part, ScoredGroups):
            raise ValueError(f"dynamic sampling: draw() returned {type(part).__name__}; "
                             "expected ScoredGroups")
        part.num_groups(group_size)  # shape checks
        parts.append(part)
        flags.append(informative_groups(part.rewards, group_size, columns))
        informative = np.concatenate(flags)
        enough = informative.sum() >= num_groups
        if enough or len(parts) > max_extra_draws:
            break
    everything = concatenate(parts)
    index, filled = _choose(informative, num_groups)
    first_round = len(flags[0])
    stats = DynamicSamplingStats(
        draws=len(parts), resampled=len(informative) - first_round,
        dropped=int((~informative).sum()) - filled, filled_zero_variance=filled,
        surplus=int(informative.sum()) - (num_groups - filled))
    return take_groups(everything, index, group_size), stats
