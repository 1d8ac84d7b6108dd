"""Orbax checkpoints of a training run: the train state (params, optimizer, RECAP state, RNG,
step) plus a JSON record (stage, step, data-iterator state, ...), kept N at a time.

    manager = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=2)
    manager.save(step, state, meta)                    # synchronous, atomic (orbax tmp + rename)
    restored = manager.restore_latest(abstract_state)  # None when there is none

The state is stored as a flat dict of its leaves (``leaf_00000``, ...), and ``meta["leaves"]``
lists each leaf's pytree path, shape and dtype. Restoring first compares that listing with the
state the current config builds, so a checkpoint from another config is refused with every
mismatch listed, before any array is read. A checkpoint that cannot be read (a save killed
half-way that orbax did not finalise, a truncated or deleted file) is reported with its path
and the previous complete one is used; the damaged one is moved to
``<directory>_damaged/<step>-<ns>`` (its step will be written again; nothing is deleted).
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

__all__ = ["CheckpointMismatch", "Restored", "RunCheckpoints", "describe_leaves",
           "pack_state", "unpack_state"]

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


def pack_state(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` as {"leaf_00000": array, ...} (keys typed keys as key data)."""
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(_storable(tree)))}


def unpack_state(like: Any, packed: dict[str, Any]) -> Any:
    """Inverse of `pack_state`, with the structure (and typed keys) of ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    values = [packed[f"leaf_{i:05d}"] for i in range(len(leaves))]
    values = [jax.random.wrap_key_data(v, impl=jax.random.key_impl(ref)) if _is_key(ref) else v
              for ref, v in zip(leaves, values)]
    return jax.tree.unflatten(treedef, values)


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


class RunCheckpoints:
    """Synchronous orbax CheckpointManager of (state, meta), ``keep`` most recent kept."""

    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self.set_aside: list[str] = []  # damaged checkpoints moved away by restore_latest

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes checkpoint ``step`` (blocking until it is complete on disk)."""
        packed = pack_state(state)
        meta = dict(meta, leaves=describe_leaves(state), checksums=checksums(packed))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(packed), meta=ocp.args.JsonSave(meta)),
            force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, like: Any) -> Restored:
        """Checkpoint ``step`` restored with the structure, dtypes and shardings of ``like``."""
        where = self.path(step)
        meta = self.read_meta(step)
        check_compatible(meta.get("leaves", []), describe_leaves(like), where)
        abstract = jax.tree.map(_abstract, pack_state(like))
        packed = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        _check_sums(meta.get("checksums", {}), packed, where)
        return Restored(step, unpack_state(like, packed), meta)

    def restore_params(self, step: int, like_params: Any, meta: dict | None = None) -> Any:
        """Only the ``.params`` leaves of checkpoint ``step``, with the structure, dtypes and
        shardings of ``like_params`` (the optimizer state is neither built nor read)."""
        where = self.path(step)
        meta = self.read_meta(step) if meta is None else meta
        saved = meta.get("leaves", [])
        keys = [f"leaf_{i:05d}" for i, (path, _, _) in enumerate(saved)
                if path.startswith(".params")]
        expected = [[".params" + path, shape, dtype]
                    for path, shape, dtype in describe_leaves(like_params)]
        check_compatible([row for row in saved if row[0].startswith(".params")], expected, where)
        leaves, treedef = jax.tree.flatten(like_params)
        abstract = {key: _abstract(leaf) for key, leaf in zip(keys, leaves)}
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(where, "state"), args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)
                    if x.sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray),
                    abstract), partial_restore=True))
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
        self._manager.close()
