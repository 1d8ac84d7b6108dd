"""Device meshes and the logical-axis rules that place parameters and activations on them.

Every parameter carries logical axis names (``nnx.Param`` metadata ``logical_axes``, see
``recap_jax.models.qwen2_5_vl.layers``). One table, `DEFAULT_RULES`, maps each logical name
to a mesh axis (or several, or none). A dimension is sharded only when the mesh axis size
divides it; otherwise it stays replicated, or — when `strict` is asked for — a clear error
names the tensor, the dimension and the mesh axis.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (str), several mesh axes (tuple), or None (replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_head_dim": None,
    "vision_mlp": "tensor",
    "vision_merge": "fsdp",
    "vision_merge_hidden": "tensor",
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "activation_embed": None,
}


class ShardingError(ValueError):
    """A mesh that cannot hold a tensor as the rules ask (the message names both)."""


def _mesh_axis_size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...]) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: Mapping[str, str | tuple[str, ...] | None] | None = None, *,
                    strict: bool = False, name: str = "tensor") -> PartitionSpec:
    """The PartitionSpec of a tensor with these logical axes on ``mesh``.

    A mesh axis is used at most once per tensor (first dimension wins) and only if its size
    divides the dimension; with ``strict`` a non-dividing size raises `ShardingError`.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, (axis, size) in enumerate(zip(logical_axes, shape)):
        target = rules.get(axis) if axis is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
        if not targets:
            spec.append(None)
            continue
        mesh_size = _mesh_axis_size(mesh, targets)
        if size % mesh_size:
            if strict:
                raise ShardingError(f"{name}: dimension {dim} ({axis}={size}) is not divisible by mesh axes "
                                    f"{targets} of size {mesh_size}")
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                        rules: Mapping[str, str | tuple[str, ...] | None] | None = None, **kw) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules, **kw))
