"""Frozen parameters by path, without touching the model: the policy's log-prob function sees
them through ``jax.lax.stop_gradient``, so autodiff never linearises what only they feed.

`freeze_vision(logprob_fn)` is ``model.freeze_vision``: the vision tower (patch embedding and
blocks) becomes a constant of the loss. The merger stays trainable, so the gradient stops at
the merger's input: nothing upstream of it has a tangent, JAX emits no backward pass for the
tower (its matmuls vanish from the compiled step), and the tower's parameters get exactly
zero gradient. Pair it with `frozen_optimizer` so that the optimizer keeps no state for the
frozen parameters and never changes them (AdamW's weight decay would).

Parameter paths are "/"-joined attribute names of ``nnx.state(model)``, e.g.
``visual/blocks/attn/qkv/kernel`` or ``language_model/layers/mlp/up_proj/kernel``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx

__all__ = ["VISION_TOWER", "VISION_ALL", "freeze_paths", "freeze_vision", "frozen_optimizer",
           "param_path", "path_labels"]

VISION_TOWER = r"^visual/(patch_embed|blocks)/"  # below the merger
VISION_ALL = r"^visual/"  # the merger too


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_path(path: tuple) -> str:
    """"a/b/c" of a jax tree path (dict keys, attribute names or sequence indices)."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        return [re.compile(p) for p in patterns]
    except re.error as error:
        raise ValueError(f"freeze: bad parameter path pattern ({error}) in {tuple(patterns)}") from None


def path_labels(params: Any, patterns: Sequence[str], match: str = "frozen",
                other: str = "trainable") -> Any:
    """A tree like ``params`` holding ``match`` where a leaf's path matches a pattern (re.search),
    else ``other``. Raises if a pattern matches nothing (a typo would silently freeze nothing)."""
    compiled = _compile(patterns)
    used = [False] * len(compiled)

    def label(path, _):
        name = param_path(path)
        hits = [i for i, p in enumerate(compiled) if p.search(name)]
        for i in hits:
            used[i] = True
        return match if hits else other

    labels = jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)
    unused = [p.pattern for p, u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(f"freeze: pattern(s) {unused} match no parameter; paths look like "
                         "'visual/blocks/attn/qkv/kernel'")
    return labels


def _stop_gradient_where(params: Any, labels: Any, match: str = "frozen") -> Any:
    def maybe_stop(variable, label):
        return jax.lax.stop_gradient(variable) if label == match else variable

    return jax.tree.map(maybe_stop, params, labels, is_leaf=_is_variable)


def freeze_paths(logprob_fn: Callable, patterns: Sequence[str]) -> Callable:
    """``logprob_fn(params, batch)`` whose parameters matching ``patterns`` are constants."""
    def frozen_logprob_fn(params, batch):
        return logprob_fn(_stop_gradient_where(params, path_labels(params, patterns)), batch)

    return frozen_logprob_fn


def freeze_vision(logprob_fn: Callable, merger: bool = False) -> Callable:
    """``model.freeze_vision``: the vision tower frozen (and the merger too with ``merger``)."""
    return freeze_paths(logprob_fn, (VISION_ALL if merger else VISION_TOWER,))


def frozen_optimizer(optimizer: optax.GradientTransformation, params: Any,
                     patterns: Sequence[str]) -> optax.GradientTransformation:
    """``optimizer`` on the parameters not matching ``patterns``; the others get zero updates
    and no optimizer state (``optax.multi_transform`` with ``set_to_zero``)."""
    labels = path_labels(params, patterns)
    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()},
                                 lambda _: labels)
