"""Stop strings and per-source completion limits, applied on the host after sampling.

The compiled sampler stops at EOS or at one static ``max_new_tokens`` for every source. Two
things it cannot do are done here, on the decoded batch, before scoring:

* stop strings (e.g. ``"</answer>"``): a completion ends with the token that completes the
  first occurrence of any stop string; its text keeps the stop string (a format reward needs
  it; ``include_stop=False`` cuts it off), its length becomes that token count, and it is no
  longer truncated;
* a per-source limit ``max_new_tokens`` below the sampler's: a longer completion is cut to
  the limit and marked truncated (the sampler still spent the tokens; bucket sources by
  limit to save them).

`finish_completions` returns the texts to score and the lengths / truncation flags / token
mask that the train batch must use instead of the sampler's (the log-probs beyond a new
length are simply masked out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["FinishedCompletions", "finish_completions", "stop_token_count"]


@dataclasses.dataclass(frozen=True)
class FinishedCompletions:
    """texts [N] str; lengths [N] int32; truncated [N] bool; mask [N, T] int32 (1 on the
    first ``lengths`` tokens); stopped [N] bool: a stop string ended the completion."""

    texts: list[str]
    lengths: np.ndarray
    truncated: np.ndarray
    mask: np.ndarray
    stopped: np.ndarray


def _first_stop(text: str, stop: Sequence[str]) -> tuple[int, int]:
    """(start, end) of the earliest stop string occurrence in ``text`` (ties: the longest),
    or (-1, -1)."""
    best = (-1, -1)
    for s in stop:
        at = text.find(s)
        if at >= 0 and (best[0] < 0 or at < best[0] or (at == best[0] and at + len(s) > best[1])):
            best = (at, at + len(s))
    return best


def stop_token_count(ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                     stop: Sequence[str]) -> int | None:
    """The fewest leading tokens of ``ids`` whose decoded text contains a stop string, or
    None. Binary search over prefixes (O(log n) decodes): a prefix that contains a stop
    string stays containing it as tokens are appended."""
    if _first_stop(decode(list(ids)), stop)[0] < 0:
        return None
    low, high = 1, len(ids)  # the answer lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if _first_stop(decode(list(ids[:mid])), stop)[0] >= 0:
            high = mid
        else:
            low = mid + 1
    return low


def _check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        raise ValueError(f"stop strings: got the string {stop!r}; pass a sequence of strings, "
                         f"e.g. ({stop!r},)")
    stop = tuple(stop)
    bad = [s for s in stop if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"stop strings: {bad!r} are not non-empty strings")
    return stop


def finish_completions(tokens: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                       decode: Callable[[Sequence[int]], str], *, stop: Sequence[str] = (),
                       max_new_tokens: int | None = None,
                       include_stop: bool = True) -> FinishedCompletions:
    """Applies the per-source limit, then the stop strings, to sampled completions.

    tokens [N, T], lengths [N] (tokens generated, EOS included), truncated [N]: the sampler's
    output (`sampling.GenerationOutput`). decode(ids) -> text of a completion's token ids
    (dropping EOS / padding, e.g. the tokenizer's decode as `rollout.decode_completions`
    uses it). max_new_tokens: None, or the source's limit (an int in [1, T]).
    """
    stop = _check_stop(stop)
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths, np.int64).copy()
    truncated = np.asarray(truncated, bool).copy()
    rows, steps = tokens.shape
    if lengths.shape != (rows,) or truncated.shape != (rows,):
        raise ValueError(f"finish_completions: lengths {lengths.shape} and truncated "
                         f"{truncated.shape} must have one entry per row of tokens {tokens.shape}")
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or not 1 <= max_new_tokens <= steps:
            raise ValueError(f"finish_completions: max_new_tokens={max_new_tokens!r}; expected "
                             f"None or an int in [1, {steps}] (the sampler's length)")
        over = lengths > max_new_tokens
        truncated |= over
        lengths = np.minimum(lengths, max_new_tokens)
    texts, stopped = [], np.zeros((rows,), bool)
    for row in range(rows):
        ids = tokens[row, :lengths[row]].tolist()
        count = stop_token_count(ids, decode, stop) if stop else None
        if count is not None:
            lengths[row], truncated[row], stopped[row] = count, False, True
            ids = ids[:count]
        text = decode(ids)
        if count is not None:
            start, end = _first_stop(text, stop)
            text = text[:end] if include_stop else text[:start]
        texts.append(text)
    mask = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.int32)
    return FinishedCompletions(texts, lengths.astype(np.int32), truncated, mask, stopped)
