"""Device meshes, logical-axis sharding rules, multi-host start-up and precision policies.

Mesh. A 3-axis mesh ``(data, fsdp, tensor)`` (all ``AxisType.Auto``) built by `make_mesh`
from a `MeshConfig` (sizes in the config, -1 = "the remaining devices"). With
``distributed=True`` it first runs ``jax.distributed.initialize`` (environment-driven on
TPU / SLURM / ..., or with an explicit coordinator).

Partitioning. Every parameter carries logical axis names (``nnx.Param`` metadata
``logical_axes``, see ``models/qwen2_5_vl/layers.py``); activations name theirs at the call
(`constrain`). One table, `DEFAULT_RULES`, maps each logical name to a mesh axis, several, or
none, so data parallelism, FSDP (parameters and optimizer state split over ``fsdp``), tensor
parallelism (heads and MLP over ``tensor``) and their combinations all follow from the mesh
sizes alone. A parameter dimension that its mesh axes do not divide is an error
(`ShardingError`, naming the tensor) unless ``strict=False`` asks to replicate it instead.

Batches. The global batch is split over ``("data", "fsdp")`` along its row axis; each process
passes its own rows to `shard_batch`, which assembles the global array with
``jax.make_array_from_process_local_data``.

Precision and rematerialisation policies live in `recap_jax.precision`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

Rules = Mapping[str, "str | tuple[str, ...] | None"]

# logical axis -> mesh axis (str), several mesh axes (tuple), or None (replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
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
    "batch": BATCH_MESH_AXES,
    "length": None,
    "cache_length": None,
    "activation_embed": None,
    "activation_vocab": "tensor",
    "vision_tokens": BATCH_MESH_AXES,
}


class ShardingError(ValueError):
    """A mesh that cannot hold a tensor or a batch as the rules ask (the message names both).

    ``problem`` is the message without the ``hint`` on what to change.
    """

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(f"{problem}. {hint[0].upper()}{hint[1:]}." if hint else problem)
        self.problem = problem


class MeshConfigError(ValueError):
    """An invalid mesh / multi-host setting; the message names the field (``mesh.<field>``)."""


# ----------------------------------------------------------------------------- mesh config
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes and multi-host start-up.

    data, fsdp, tensor: sizes of the mesh axes; exactly one of them may be -1 ("all the
      devices the other two leave"). data: pure data parallelism (parameters replicated);
      fsdp: data parallelism with parameters and optimizer state split; tensor: heads / MLP
      hidden units / vocabulary split (Megatron-style tensor parallelism).
    distributed: run ``jax.distributed.initialize`` before building the mesh (multi-host).
    coordinator_address, num_processes, process_id, local_device_ids: explicit arguments of
      ``jax.distributed.initialize`` ("host:port", N, i < N, local device ids); leave them None
      to let JAX read the cluster environment (TPU pods, SLURM, Open MPI, ...).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.local_device_ids is not None and not isinstance(self.local_device_ids, tuple):
            ids = self.local_device_ids
            object.__setattr__(self, "local_device_ids", (ids,) if isinstance(ids, int) else tuple(ids))
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if not _is_int(size) or not (size == -1 or size >= 1):
                _mesh_fail(axis, f"must be a positive integer or -1 (the remaining devices), got {size!r}")
        if sum(size == -1 for size in sizes.values()) > 1:
            _mesh_fail("fsdp", f"at most one axis may be -1, got {sizes}")
        if not isinstance(self.distributed, bool):
            _mesh_fail("distributed", f"must be True or False, got {self.distributed!r}")
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and not self.distributed:
            _mesh_fail("distributed", "is False but coordinator_address / num_processes / process_id are "
                                      "set; set mesh.distributed=True to start a multi-host run")
        if self.coordinator_address is not None:
            if not isinstance(self.coordinator_address, str) or not re.fullmatch(r".+:\d+",
                                                                                 self.coordinator_address):
                _mesh_fail("coordinator_address", f"must be 'host:port', got {self.coordinator_address!r}")
            for name in ("num_processes", "process_id"):
                if getattr(self, name) is None:
                    _mesh_fail(name, "is required when coordinator_address is given")
        if self.num_processes is not None and (not _is_int(self.num_processes) or self.num_processes < 1):
            _mesh_fail("num_processes", f"must be a positive integer, got {self.num_processes!r}")
        if self.process_id is not None:
            if not _is_int(self.process_id) or self.process_id < 0:
                _mesh_fail("process_id", f"must be a non-negative integer, got {self.process_id!r}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                _mesh_fail("process_id", f"{self.process_id} is not below num_processes={self.num_processes}")

    @classmethod
    def from_config(cls, config: Any = None) -> "MeshConfig":
        """From a MeshConfig, a mapping / ml_collections.ConfigDict of its fields, or None (defaults)."""
        return dataclass_from_config(cls, config, "mesh", MeshConfigError)

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """{axis: size} with -1 resolved, checked against ``num_devices``."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        product = math.prod(s for s in sizes.values() if s != -1)
        free = [axis for axis, s in sizes.items() if s == -1]
        if free:
            if num_devices % product:
                _mesh_fail(free[0], f"-1 cannot take the rest: {num_devices} devices are not divisible by the "
                                    f"other axes' product {product} ({sizes})")
            sizes[free[0]] = num_devices // product
        elif product != num_devices:
            shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
            _mesh_fail("fsdp", f"the mesh {shown} needs {product} devices but {num_devices} are available "
                               "(set one axis to -1 to take the rest)")
        return sizes


def dataclass_from_config(cls, config: Any, section: str, error: type[Exception] = ValueError):
    """``cls`` from an instance, a mapping / ml_collections.ConfigDict of its fields, or None
    (defaults); an unknown field is an ``error`` naming ``<section>.<field>``."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise error(f"{section}: expected a {cls.__name__} or a mapping of its fields, got {type(config)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise error(f"{section}.{unknown[0]}: unknown field (known: {sorted(known)})")
    return cls(**dict(config))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _mesh_fail(field: str, message: str) -> None:
    raise MeshConfigError(f"mesh.{field}: {message}")


def get_config():
    """The mesh block of an experiment config (an ml_collections.ConfigDict; see `MeshConfig`)."""
    import ml_collections

    fields = {f.name: f.default for f in dataclasses.fields(MeshConfig)}
    return ml_collections.ConfigDict(fields, type_safe=False)


def parse_mesh_spec(spec: str) -> MeshConfig:
    """'fsdp=8' or 'data=2,fsdp=-1,tensor=2' -> MeshConfig (unnamed axes keep their defaults,
    except that fsdp becomes 1 when another axis is -1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in MESH_AXES:
            raise MeshConfigError(f"mesh: cannot read {part!r} in {spec!r}; expected e.g. 'data=2,fsdp=4,tensor=1'")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise MeshConfigError(f"mesh.{name.strip()}: {value!r} is not an integer") from None
    if "fsdp" not in sizes:
        sizes["fsdp"] = 1 if -1 in sizes.values() else -1
    return MeshConfig(**sizes)


# ----------------------------------------------------------------------------- multi-host
def initialize_distributed(config: MeshConfig | Mapping | None) -> bool:
    """Runs ``jax.distributed.initialize`` when ``config.distributed``; True if it ran now.

    Without explicit coordinator arguments JAX detects the cluster from the environment
    (TPU pod metadata, SLURM, Open MPI, ...). Calling it again after start-up is a no-op.
    Must run before anything touches the devices.
    """
    config = MeshConfig.from_config(config)
    if not config.distributed or jax.distributed.is_initialized():
        return False
    kwargs = {k: getattr(config, k) for k in ("coordinator_address", "num_processes", "process_id",
                                             "local_device_ids") if getattr(config, k) is not None}
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(config: MeshConfig | Mapping | None = None, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh (Auto axis types) over ``devices`` (default: all)."""
    config = MeshConfig.from_config(config)
    initialize_distributed(config)
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ----------------------------------------------------------------------------- logical axes -> specs
def _mesh_axis_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules | None = None, *,
                    strict: bool = True, name: str = "tensor") -> PartitionSpec:
    """The PartitionSpec of a tensor with these logical axes on ``mesh`` (a Mesh or AbstractMesh).

    A mesh axis is used at most once per tensor (first dimension wins); axes of size 1 or
    absent from the mesh are dropped. When the mesh axes do not divide the dimension, strict
    raises `ShardingError`; otherwise the dimension is replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{name}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, (axis, size) in enumerate(zip(logical_axes, shape)):
        target = rules.get(axis) if axis is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
        if not targets:
            spec.append(None)
            continue
        mesh_size = _mesh_axis_size(mesh, targets)
        if size % mesh_size:
            if strict:
                raise ShardingError(
                    f"{name} (shape {tuple(shape)}, logical axes {tuple(logical_axes)}): dimension {dim} "
                    f"({axis}={size}) is not divisible by mesh axes {targets} of size {mesh_size}",
                    hint=f"use a mesh whose {'x'.join(targets)} size divides {size}, or map {axis!r} to None "
                         "in the rules (or pass strict=False) to replicate it")
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    while spec and spec[-1] is None:  # XLA's own spelling, so jit caches see one sharding
        spec.pop()
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                        rules: Rules | None = None, **kw) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules, **kw))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None, *, strict: bool = True) -> Any:
    """NamedShardings for every array of ``tree``, with the tree's own structure.

    ``nnx.Variable`` leaves with ``logical_axes`` metadata follow the rules (this covers the
    parameters and the optimizer moments that optax builds from them); every other array
    (step counters, RNG keys, scalars) is replicated. Works on arrays and ShapeDtypeStructs.
    With ``strict``, one `ShardingError` lists every tensor the mesh does not divide.
    """
    problems: list[str] = []

    def sharding_of(path, leaf):
        if not _is_variable(leaf):
            return NamedSharding(mesh, PartitionSpec())
        shape = np.shape(leaf.get_value())
        axes = leaf.get_metadata().get("logical_axes")
        if axes is None or len(shape) != len(axes):  # e.g. a scalar count wrapped by optax
            axes = (None,) * len(shape)
        try:
            spec = logical_to_spec(axes, shape, mesh, rules, strict=strict, name=jax.tree_util.keystr(path))
        except ShardingError as e:
            problems.append(e.problem)
            spec = PartitionSpec()
        return leaf.replace(NamedSharding(mesh, spec))

    shardings = jax.tree_util.tree_map_with_path(sharding_of, tree, is_leaf=_is_variable)
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ShardingError(
            f"the mesh {dict(mesh.shape)} does not divide {len(problems)} tensor(s):\n  " + "\n  ".join(shown)
            + "\nUse mesh axis sizes that divide these dimensions, map their logical axes to None in the rules, "
              "or pass strict=False to replicate them.")
    return shardings


def param_shardings(model_or_state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None, *,
                    strict: bool = True) -> Any:
    """A pytree of NamedSharding matching ``nnx.state(model)`` (or the given state / pytree)."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return tree_shardings(state, mesh, rules, strict=strict)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules | None = None, *,
                strict: bool = True) -> nnx.Module:
    """Moves every parameter of ``model`` onto its sharding (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules, strict=strict)))
    return model


def create_sharded(fn: Callable[..., Any], *args: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None,
                   strict: bool = True) -> Any:
    """``fn(*args)`` computed by a jit whose outputs land directly on their shardings.

    The output shapes come from ``jax.eval_shape`` (nothing allocated), their shardings from
    `tree_shardings`; e.g. a whole train state:
    ``create_sharded(lambda p: TrainState.create(p, optimizer, key), params, mesh=mesh)``.
    """
    shardings = tree_shardings(jax.eval_shape(fn, *args), mesh, rules, strict=strict)
    return jax.jit(fn, out_shardings=shardings)(*args)


# ----------------------------------------------------------------------------- activations
_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("recap_jax_rules", default=None)


def current_rules() -> Rules:
    """The rules `constrain` uses: those of the innermost `use_mesh`, else DEFAULT_RULES."""
    rules = _ACTIVE_RULES.get()
    return DEFAULT_RULES if rules is None else rules


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Iterator[jax.sharding.Mesh]:
    """``jax.set_mesh(mesh)`` plus the logical rules for `constrain` (read when tracing)."""
    token = _ACTIVE_RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """A sharding constraint on an activation by logical axis names; no-op without a mesh.

    E.g. ``constrain(h, ("batch", "length", "activation_embed"))``. Dimensions the mesh does
    not divide (a decode batch of 1, say) stay replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, current_rules() if rules is None else rules,
                           strict=False)
    return jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------- batches
def batch_spec(ndim: int, batch_axis: int | None, mesh, rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec of an input with its rows on ``batch_axis`` (None: replicated)."""
    if batch_axis is None:
        return PartitionSpec()
    target = (DEFAULT_RULES if rules is None else rules).get("batch")
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    if not axes:
        return PartitionSpec()
    return PartitionSpec(*[None] * batch_axis, axes[0] if len(axes) == 1 else axes)


def _local_batch_shards(sharding: NamedSharding, batch_axis: int, ndim: int) -> tuple[int, int]:
    """(distinct row slices this process's devices hold, row slices in the whole mesh)."""
    spec = sharding.spec
    axes = spec[batch_axis] if batch_axis < len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    total = _mesh_axis_size(sharding.mesh, axes)
    probe = [1] * ndim
    probe[batch_axis] = total
    local = {index[batch_axis].start for index in sharding.addressable_devices_indices_map(tuple(probe)).values()}
    return len(local), total


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh, *, batch_axes: Any = 0,
                rules: Rules | None = None) -> Any:
    """This process's rows -> global arrays split over the batch mesh axes ("data", "fsdp").

    batch_axes: the row axis of every leaf (an int), or a pytree prefix of ``local_batch``
      giving it per leaf (None = replicated: every process must pass the same value).
    With P processes each holding B_local rows, the global batch has B_local * P rows; each
    process's rows fill the row slices its devices hold (process 0's rows first on a mesh
    from `make_mesh`, whose device order follows the processes). Rows that do not split
    evenly over the batch shards raise `ShardingError` naming the leaf, before anything is
    compiled.
    """
    def place(path: str, leaf: Any, axis: int | None) -> jax.Array:
        leaf = np.asarray(leaf)
        spec = batch_spec(leaf.ndim, axis, mesh, rules)
        sharding = NamedSharding(mesh, spec)
        if axis is not None:
            if not 0 <= axis < leaf.ndim:
                raise ShardingError(f"batch{path}: row axis {axis} but the leaf has shape {leaf.shape}")
            local_shards, total = _local_batch_shards(sharding, axis, leaf.ndim)
            if leaf.shape[axis] % local_shards:
                raise ShardingError(
                    f"batch{path}: {leaf.shape[axis]} rows (axis {axis} of shape {leaf.shape}) on this process "
                    f"cannot be split evenly over the {local_shards} batch shards its devices hold (mesh axes "
                    f"{spec[axis]}, {total} shards in all); use a multiple of {local_shards} rows per process")
        return jax.make_array_from_process_local_data(sharding, leaf)

    def place_subtree(prefix_path, axis, subtree):
        prefix = jax.tree_util.keystr(prefix_path)
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: place(prefix + jax.tree_util.keystr(path), leaf, axis), subtree)

    if batch_axes is None or isinstance(batch_axes, int):
        return place_subtree((), batch_axes, local_batch)
    return jax.tree_util.tree_map_with_path(place_subtree, batch_axes, local_batch, is_leaf=lambda x: x is None)


def check_divisible(tree: Any, what: str = "tree") -> None:
    """Raises `ShardingError` naming the first leaf (array or ShapeDtypeStruct with a
    NamedSharding) whose dimensions its mesh axes do not divide."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            continue
        for dim, axes in enumerate(sharding.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            size = _mesh_axis_size(sharding.mesh, axes)
            if leaf.shape[dim] % size:
                raise ShardingError(f"{what}{jax.tree_util.keystr(path)}: dimension {dim} of shape {leaf.shape} is "
                                    f"not divisible by mesh axes {axes} of size {size}")
