"""Orbax checkpoints of a training run: the train state (params, optimizer, RECAP state, RNG,
step) plus a JSON record (stage, step, data-iterator state, ...), kept N at a time.

    manager = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=2)
    manager.save(step, state, meta)                    # returns once the arrays are on the host
    restored = manager.restore_latest(abstract_state)  # None when there is none
    manager.close()                                    # waits for the last save to be final

Saves are asynchronous (orbax ``enable_async_checkpointing``): `save` copies the arrays to
host memory and returns; a background thread writes them into a temporary directory that
orbax renames to ``<step>/`` only when every file is written (atomic: a run killed mid-write
leaves no ``<step>/``, or a ``<step>/`` without its commit marker, which is not listed). The
next `save`, any restore or listing, and `close` first wait for the save in flight (and
re-raise its error, if it failed). ``async_save=False`` blocks in `save` instead.

The state is stored as a named tree: a nested dict keyed by the components of each leaf's
pytree path (``params/language_model/embed_tokens/embedding/value``,
``opt_state/inner/1/0/mu/...``, ``rng``, ``step``), so orbax's own tools
(``ocp.StandardCheckpointer().metadata(<step>/state)``) list the parameters by name.
``meta["leaves"]`` lists each leaf's pytree path, shape and dtype and ``meta["checksums"]``
its sum |x|, keyed by the dotted name. Restoring first compares that listing with the state
the current config builds, so a checkpoint from another config is refused with every
mismatch listed, before any array is read; after reading, the checksums are compared. A
checkpoint that cannot be read (a save killed half-way that orbax did not finalise, a
truncated or deleted file) is reported with its path and the previous complete one is used;
the damaged one is moved to ``<directory>_damaged/<step>-<ns>`` (its step will be written
again; nothing is deleted). Checkpoints of the earlier flat layout (``leaf_00000``, ...; no
``meta["layout"]``) are still read.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointMismatch", "Restored", "RunCheckpoints", "describe_leaves", "flat_named",
           "leaf_names", "named_state", "pack_state", "unpack_named", "unpack_state"]

LAYOUT = "named"  # meta["layout"] of checkpoints written by this module

_log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not match the state the config builds."""


class Restored(NamedTuple):
    step: int
    state: Any
    meta: dict


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def describe_leaves(tree: Any) -> list[list]:
    """[[path, shape, dtype], ...] of the storable leaves of ``tree`` (arrays or abstract)."""
    leaves = jax.tree_util.tree_leaves_with_path(_storable(tree))
    return [[jax.tree_util.keystr(path), list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
            for path, leaf in leaves]


# --------------------------------------------------------------------------- named layout


def _key_name(entry: Any) -> str:
    """One pytree path entry as a name component (dict key, attribute, index)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def leaf_names(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The name (tuple of path components, after ``prefix``) of every leaf of ``tree``, in leaf
    order. ValueError if two leaves get the same name or a component holds a "." (orbax joins
    the components with dots)."""
    names = [prefix + tuple(_key_name(e) for e in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    for name in names:
        bad = [part for part in name if "." in part or not part]
        if bad:
            raise ValueError(f"checkpoint: leaf {'/'.join(name)} has a path component {bad[0]!r} "
                             "that cannot name an orbax tree key (empty or holding '.')")
    if len(set(names)) != len(names):
        seen, dup = set(), None
        for name in names:
            dup = name if name in seen else dup
            seen.add(name)
        raise ValueError(f"checkpoint: two leaves are both named {'/'.join(dup)}")
    return names


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    """[(("a", "b"), x), ...] -> {"a": {"b": x}}."""
    root: dict = {}
    for name, value in items:
        node = root
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1]] = value
    return root


def _lookup(nested: dict, name: tuple[str, ...]) -> Any:
    node = nested
    for part in name:
        node = node[part]
    return node


def named_state(tree: Any) -> dict:
    """The storable leaves of ``tree`` as a nested dict keyed by their path components (the
    tree orbax writes: parameter paths readable by orbax's tools)."""
    storable = _storable(tree)
    return _nest(list(zip(leaf_names(storable), jax.tree.leaves(storable))))


def flat_named(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"params.language_model....": leaf} of ``tree``'s storable leaves (checksum keys)."""
    storable = _storable(tree)
    return {".".join(name): leaf for name, leaf in zip(leaf_names(storable, prefix),
                                                     jax.tree.leaves(storable))}


def _rewrap(like: Any, values: list) -> Any:
    """``values`` in the structure of ``like``, typed PRNG keys rewrapped."""
    leaves, treedef = jax.tree.flatten(like)
    values = [jax.random.wrap_key_data(v, impl=jax.random.key_impl(ref)) if _is_key(ref) else v
              for ref, v in zip(leaves, values)]
    return jax.tree.unflatten(treedef, values)


def unpack_named(like: Any, nested: dict, prefix: tuple[str, ...] = ()) -> Any:
    """Inverse of `named_state`, with the structure (and typed keys) of ``like``."""
    names = leaf_names(_storable(like), prefix)
    return _rewrap(like, [_lookup(nested, name) for name in names])


# --------------------------------------------------------------------------- flat layout (read)


def pack_state(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` as {"leaf_00000": array, ...}: the earlier flat layout, still
    read (restore of checkpoints written before the named layout)."""
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(_storable(tree)))}


def unpack_state(like: Any, packed: dict[str, Any]) -> Any:
    """Inverse of `pack_state`, with the structure (and typed keys) of ``like``."""
    return _rewrap(like, [packed[f"leaf_{i:05d}"] for i in range(len(jax.tree.leaves(like)))])


@jax.jit
def _leaf_checksums(packed: dict[str, Any]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), packed)


def checksums(packed: dict[str, Any]) -> dict[str, float]:
    """sum |x| of every leaf: cheap, and it catches zero-filled or garbled tensors that a
    storage layer might hand back without an error."""
    return {k: float(v) for k, v in jax.device_get(_leaf_checksums(packed)).items()}


def _check_sums(saved: dict[str, float], packed: dict[str, Any], where: str) -> None:
    for key, value in checksums(packed).items():
        expected = saved.get(key)
        if expected is not None and not abs(value - expected) <= 1e-4 * abs(expected) + 1e-6:
            raise IOError(f"checkpoint {where}: tensor {key} reads back with checksum {value} "
                          f"but was saved with {expected} (corrupt file)")


def _abstract(leaf: Any) -> Any:
    sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def check_compatible(saved: list[list], expected: list[list], where: str) -> None:
    """CheckpointMismatch listing every leaf whose path, shape or dtype differs."""
    saved_map = {path: (tuple(shape), dtype) for path, shape, dtype in saved}
    expected_map = {path: (tuple(shape), dtype) for path, shape, dtype in expected}
    problems = []
    for path, (shape, dtype) in expected_map.items():
        if path not in saved_map:
            problems.append(f"  {path}: missing (expected {list(shape)} {dtype})")
        elif saved_map[path] != (shape, dtype):
            found = saved_map[path]
            problems.append(f"  {path}: expected {list(shape)} {dtype}, found {list(found[0])} "
                            f"{found[1]}")
    problems += [f"  {path}: unexpected (not in this config's state)"
                 for path in saved_map if path not in expected_map]
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {where} does not match the state this config builds "
            f"({len(problems)} differences; was it written by another config?):\n"
            + "\n".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))


def _abstract_named(like: Any, prefix: tuple[str, ...] = ()) -> dict:
    """The named tree of ``like`` as ShapeDtypeStructs with ``like``'s shardings."""
    storable = _storable(like)
    return _nest([(name, _abstract(leaf)) for name, leaf in
                  zip(leaf_names(storable, prefix), jax.tree.leaves(storable))])


def _restore_args(abstract: Any) -> Any:
    """Per-leaf orbax restore arguments: onto the leaf's sharding, else as a numpy array."""
    return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)
                        if x.sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray),
                        abstract)


class RunCheckpoints:
    """Orbax CheckpointManager of (state, meta), ``keep`` most recent kept, saved in the
    background (``async_save``; see the module docstring)."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self.set_aside: list[str] = []  # damaged checkpoints moved away by restore_latest

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight (if any) is final on disk; re-raises its error."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (after the save in flight is final)."""
        self.wait_until_finished()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts writing checkpoint ``step``: returns once the arrays are copied off the
        devices (``state`` may then be donated); the files are final when the next save,
        restore or `close` returns (or at once with ``async_save=False``)."""
        self.wait_until_finished()  # one save in flight at a time; its error surfaces here
        flat = flat_named(state)
        meta = dict(meta, layout=LAYOUT, leaves=describe_leaves(state), checksums=checksums(flat))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(named_state(state)), meta=ocp.args.JsonSave(meta)),
            force=True)
        if not self.async_save:
            self.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        self.wait_until_finished()
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, like: Any) -> Restored:
        """Checkpoint ``step`` restored with the structure, dtypes and shardings of ``like``."""
        where = self.path(step)
        meta = self.read_meta(step)
        check_compatible(meta.get("leaves", []), describe_leaves(like), where)
        if meta.get("layout") != LAYOUT:
            return Restored(step, self._restore_flat(step, like, meta), meta)
        nested = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_named(like))))["state"]
        state = unpack_named(like, nested)
        _check_sums(meta.get("checksums", {}), flat_named(state), where)
        return Restored(step, state, meta)

    def _restore_flat(self, step: int, like: Any, meta: dict) -> Any:
        """A checkpoint of the earlier flat layout (leaf_00000, ...)."""
        abstract = jax.tree.map(_abstract, pack_state(like))
        packed = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        _check_sums(meta.get("checksums", {}), packed, self.path(step))
        return unpack_state(like, packed)

    def restore_params(self, step: int, like_params: Any, meta: dict | None = None) -> Any:
        """Only the ``.params`` leaves of checkpoint ``step``, with the structure, dtypes and
        shardings of ``like_params`` (the optimizer state is neither built nor read)."""
        where = self.path(step)
        meta = self.read_meta(step) if meta is None else meta
        saved = meta.get("leaves", [])
        expected = [[".params" + path, shape, dtype]
                    for path, shape, dtype in describe_leaves(like_params)]
        check_compatible([row for row in saved if row[0].startswith(".params")], expected, where)
        if meta.get("layout") != LAYOUT:
            return self._restore_params_flat(where, like_params, meta)
        abstract = _abstract_named(like_params, prefix=("params",))
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(where, "state"), args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=_restore_args(abstract), partial_restore=True))
        params = unpack_named(like_params, restored, prefix=("params",))
        _check_sums(meta.get("checksums", {}), flat_named(params, prefix=("params",)), where)
        return params

    def _restore_params_flat(self, where: str, like_params: Any, meta: dict) -> Any:
        keys = [f"leaf_{i:05d}" for i, (path, _, _) in enumerate(meta.get("leaves", []))
                if path.startswith(".params")]
        leaves, treedef = jax.tree.flatten(like_params)
        abstract = {key: _abstract(leaf) for key, leaf in zip(keys, leaves)}
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(where, "state"), args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=_restore_args(abstract), partial_restore=True))
        packed = {key: restored[key] for key in keys}
        _check_sums(meta.get("checksums", {}), packed, where)
        return jax.tree.unflatten(treedef, [packed[key] for key in keys])

    def restore_latest(self, like: Any) -> Restored | None:
        """The newest readable checkpoint (older ones are tried when the newest is damaged);
        None when there is none. ``like`` is the state to restore into, or a function of the
        checkpoint's meta dict returning it (e.g. a different state per training stage). A
        config mismatch is not "damage": it is raised."""
        for step in reversed(self.steps()):
            try:
                target = like(self.read_meta(step)) if callable(like) else like
                return self.restore(step, target)
            except CheckpointMismatch:
                raise
            except Exception as error:  # noqa: BLE001 - any read failure means "damaged"
                moved = self._set_aside(step)
                _log.warning("checkpoint %s is damaged or incomplete (%s: %s); moved to %s, "
                             "trying the previous one", self.path(step), type(error).__name__,
                             error, moved)
        return None

    def _set_aside(self, step: int) -> str:
        """Moves a damaged checkpoint out of the manager's way (its step will be written
        again) into a sibling ``<directory>_damaged/`` folder; nothing is deleted."""
        target = os.path.join(f"{self.directory}_damaged", f"{step}-{time.time_ns()}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(self.path(step), target)
        self._manager.reload()
        self.set_aside.append(target)
        return target

    def close(self) -> None:
        """Waits for the save in flight to be final, then releases orbax's resources."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()
