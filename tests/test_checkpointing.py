"""RunCheckpoints: the named layout (parameter paths readable with orbax's own tools), async
saves that let the caller donate the state at once, a save killed before orbax finalised it
is not a checkpoint, checksums and the leaf listing still guard restores, params-only
restores, and checkpoints of the earlier flat layout still read."""

import json
import pathlib
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from recap_jax import checkpointing
from recap_jax.checkpointing import CheckpointMismatch, RunCheckpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]


class State(NamedTuple):
    """Leaves named like TrainState's (attributes: .params, .opt_state, ...)."""

    params: Any
    opt_state: Any
    rng: Any
    step: Any


def make_state(seed: int = 0, size: int = 8):
    """A train-state-like tree: nested params, optax state (tuples, namedtuples), a typed
    PRNG key and a scalar step."""
    rng = np.random.default_rng(seed)
    params = {"language_model": {"layers": {"kernel": jnp.asarray(rng.normal(size=(2, size, size)),
                                                                  jnp.float32)},
                                 "norm": {"scale": jnp.asarray(rng.normal(size=size), jnp.bfloat16)}},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(size, 3)), jnp.float32)}}
    opt_state = optax.adam(1e-3).init(params)
    return State(params, opt_state, jax.random.key(seed), jnp.int32(seed))


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(checkpointing._storable(a)), jax.tree.leaves(checkpointing._storable(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_and_parameter_names_are_readable_by_orbax(tmp_path, async_save):
    manager = RunCheckpoints(str(tmp_path / "ck"), keep=2, async_save=async_save)
    state = make_state(1)
    manager.save(5, state, {"stage": "rl"})
    restored = manager.restore(5, make_state(0))
    assert restored.meta["stage"] == "rl" and restored.meta["layout"] == "named"
    assert_trees_equal(restored.state, state)
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    manager.close()
    tree = ocp.StandardCheckpointer().metadata(tmp_path / "ck" / "5" / "state").item_metadata.tree
    assert tree["params"]["language_model"]["layers"]["kernel"].shape == (2, 8, 8)
    assert tree["opt_state"]["0"]["mu"]["lm_head"]["kernel"].shape == (8, 3)
    assert not any(key.startswith("leaf_") for key in tree)
    sums = restored.meta["checksums"]
    assert "params.language_model.layers.kernel" in sums and "opt_state.0.count" in sums


def test_an_async_save_returns_before_the_files_are_final_and_the_state_can_be_donated(tmp_path):
    manager = RunCheckpoints(str(tmp_path / "ck"), keep=2)
    state = make_state(2, size=512)
    expected = jax.tree.map(np.array, checkpointing._storable(state))
    manager.save(1, state, {})
    for leaf in jax.tree.leaves(checkpointing._storable(state)):
        leaf.delete()  # what the next donated train step does to the buffers
    manager.wait_until_finished()
    assert manager.steps() == [1]
    restored = manager.restore(1, make_state(0, size=512))
    assert_trees_equal(restored.state, jax.tree.unflatten(jax.tree.structure(
        checkpointing._storable(state)), jax.tree.leaves(expected)))
    manager.close()


def test_the_next_save_and_close_wait_for_the_save_in_flight(tmp_path):
    manager = RunCheckpoints(str(tmp_path / "ck"), keep=5)
    for step in range(1, 4):
        manager.save(step, make_state(step, size=256), {"n": step})
    manager.close()
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir()) == [1, 2, 3]
    reopened = RunCheckpoints(str(tmp_path / "ck"))
    assert [reopened.read_meta(s)["n"] for s in reopened.steps()] == [1, 2, 3]
    reopened.close()


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from recap_jax.checkpointing import RunCheckpoints
    manager = RunCheckpoints(sys.argv[1], keep=5)
    manager.save(1, {"w": jnp.ones(8)}, {"n": 1})
    manager.wait_until_finished()
    manager.save(2, {"w": jnp.ones(100_000_000)}, {"n": 2})   # 400 MB: seconds to write
    print(sorted(os.listdir(sys.argv[1])), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)                      # before orbax finalises it
""")


def test_a_save_killed_before_it_was_finalised_is_not_a_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(directory)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    listed = result.stdout.strip()
    assert "tmp" in listed, listed  # the kill did land while step 2 was being written
    manager = RunCheckpoints(str(directory), keep=5)
    assert manager.steps() == [1]
    restored = manager.restore_latest({"w": jnp.zeros(8)})
    assert restored.step == 1 and restored.meta["n"] == 1
    manager.save(2, {"w": jnp.full(8, 2.0)}, {"n": 2})  # the step is written again
    assert manager.steps() == [1, 2]
    manager.close()


def test_a_wrong_checksum_is_reported_and_the_previous_checkpoint_used(tmp_path, caplog):
    manager = RunCheckpoints(str(tmp_path / "ck"), keep=5)
    manager.save(1, make_state(1), {})
    manager.save(2, make_state(2), {})
    manager.wait_until_finished()
    meta_file = tmp_path / "ck" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["params.lm_head.kernel"] += 1.0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IOError, match="params.lm_head.kernel reads back with checksum"):
        manager.restore(2, make_state(0))
    restored = manager.restore_latest(make_state(0))
    assert restored.step == 1
    assert_trees_equal(restored.state, make_state(1))
    assert manager.set_aside and any("damaged" in r.getMessage() for r in caplog.records)
    manager.close()


def test_a_state_of_another_shape_is_refused_with_the_mismatches(tmp_path):
    manager = RunCheckpoints(str(tmp_path / "ck"))
    manager.save(1, make_state(1), {})
    with pytest.raises(CheckpointMismatch, match=r"\['lm_head'\]\['kernel'\]: expected \[16, 3\]"):
        manager.restore_latest(make_state(0, size=16))
    manager.close()


def test_restore_params_reads_only_the_params(tmp_path):
    manager = RunCheckpoints(str(tmp_path / "ck"))
    state = make_state(3)
    manager.save(7, state, {})
    like = jax.tree.map(jnp.zeros_like, state.params)
    params = manager.restore_params(7, like)
    assert_trees_equal(params, state.params)
    with pytest.raises(CheckpointMismatch, match="missing"):
        manager.restore_params(7, dict(like, extra={"w": jnp.zeros(2)}))
    manager.close()


def test_checkpoints_of_the_earlier_flat_layout_still_restore(tmp_path):
    """Written as before the named layout: leaf_00000..., meta without "layout"."""
    state = make_state(4)
    packed = checkpointing.pack_state(state)
    meta = {"stage": "rl", "leaves": checkpointing.describe_leaves(state),
            "checksums": checkpointing.checksums(packed)}
    old = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False), item_names=("state", "meta"))
    old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(packed),
                                        meta=ocp.args.JsonSave(meta)))
    old.wait_until_finished()
    old.close()
    manager = RunCheckpoints(str(tmp_path / "ck"))
    assert_trees_equal(manager.restore_latest(make_state(0)).state, state)
    assert_trees_equal(manager.restore_params(3, jax.tree.map(jnp.zeros_like, state.params)),
                       state.params)
    manager.close()


class Clash:
    """A pytree node whose two children's keys print the same ("x")."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    Clash, lambda c: (((jax.tree_util.GetAttrKey("x"), c.a), (jax.tree_util.DictKey("x"), c.b)), None),
    lambda _, children: Clash(*children))


def test_leaf_names_are_the_path_components_and_clashes_are_errors():
    names = checkpointing.leaf_names({"a": {"b": 1}, "c": [2, 3]})
    assert names == [("a", "b"), ("c", "0"), ("c", "1")]
    with pytest.raises(ValueError, match="both named pair/x"):
        checkpointing.leaf_names({"pair": Clash(1, 2)})
    with pytest.raises(ValueError, match="'x.y'"):
        checkpointing.leaf_names({"x.y": 1})
