"""Two processes, one mesh: `jax.distributed.initialize` on loopback with CPU collectives.

Each process (4 simulated CPU devices) builds the 8-device mesh, creates the model on its
shards and passes only its half of the batch rows to `parallel.shard_batch`; the GRPO step's
loss, gradient norm and updated parameters must equal one process computing the whole batch
on one device.

Run by pytest; the workers are this file run as a script (``python tests/test_multihost.py
worker <process_id> <port> <out.json>``).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
GROUP, SGD_LR = 2, 0.5
METRIC_RTOL = 1e-5  # float32; the mesh only reorders sums
CHECKSUM_RTOL = 1e-5


def setup():
    """Model config, workload and the train step pieces (imported lazily: workers set XLA_FLAGS first)."""
    from recap_jax.models.qwen2_5_vl import config as C
    from recap_jax.tools import memory

    cfg = C.tiny(vocab_size=256, text_layers=2, vision_depth=2, fullatt_block_indexes=(1,))
    workload = memory.Workload(batch=8, group_size=GROUP, prompt_len=12, completion_len=6, images=1, image_size=56)
    return cfg, workload


def run_step(graphdef, params, batch, mesh=None):
    """One SGD GRPO step -> (loss, grad_norm, per-parameter sums of the updated params)."""
    import jax
    import optax

    from recap_jax import parallel, sampling
    from recap_jax.grpo import GRPOConfig
    from recap_jax.train_state import TrainState
    from recap_jax.train_step import make_train_step

    optimizer = optax.sgd(SGD_LR)
    step = make_train_step(GRPOConfig(group_size=GROUP), sampling.make_logprob_fn(graphdef, GROUP), optimizer)
    create = lambda p: TrainState.create(p, optimizer, jax.random.key(0))  # noqa: E731
    state = create(params) if mesh is None else parallel.create_sharded(create, params, mesh=mesh)
    state, metrics = step(state, batch, np.ones((1,), np.float32))
    sums = jax.jit(lambda p: [x.sum() for x in jax.tree.leaves(p)])(state.params)  # replicated scalars
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "sums": [float(s) for s in sums]}


def local_rows(batch, batch_axes, process_id, num_processes):
    """This process's contiguous share of every leaf with a row axis (whole leaf otherwise)."""
    import jax

    def take(axis, subtree):
        if axis is None:
            return subtree

        def rows(x):
            n = x.shape[axis] // num_processes
            return np.take(x, np.arange(process_id * n, (process_id + 1) * n), axis=axis)

        return jax.tree.map(rows, subtree)

    return jax.tree.map(take, batch_axes, batch, is_leaf=lambda x: x is None)


def worker(process_id: int, port: int, out_path: str) -> None:
    import jax
    from flax import nnx

    from recap_jax import parallel
    from recap_jax.models.qwen2_5_vl.sharded import init_sharded_model
    from recap_jax.tools import memory

    mesh = parallel.make_mesh(parallel.MeshConfig(
        fsdp=-1, distributed=True, coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
        process_id=process_id))
    cfg, workload = setup()
    full = memory.example_batch(cfg, workload, seed=0)  # every process sees the same data source...
    mine = local_rows(full, memory.POLICY_BATCH_AXES, process_id, NUM_PROCESSES)  # ...and keeps its half
    batch = parallel.shard_batch(mine, mesh, batch_axes=memory.POLICY_BATCH_AXES)
    graphdef, params = nnx.split(init_sharded_model(cfg, mesh, seed=0))
    with parallel.use_mesh(mesh):
        result = run_step(graphdef, params, batch, mesh)
    result.update(process_count=jax.process_count(), global_devices=jax.device_count(),
                  local_devices=jax.local_device_count(), local_rows=int(mine["completions"].shape[0]),
                  global_rows=int(batch["completions"].shape[0]))
    with open(out_path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_half_the_batch_each_equal_one_process(tmp_path):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    outs = [tmp_path / f"process{i}.json" for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(i), str(port), str(out)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]

    # meanwhile, the reference: one process, one device, the whole batch
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from recap_jax.models.qwen2_5_vl import model as M
    from recap_jax.tools import memory

    cfg, workload = setup()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.init_model(cfg, seed=0)))
    params = jax.jit(lambda: nnx.state(M.init_model(cfg, seed=0)))()
    reference = run_step(graphdef, params, jax.tree.map(jnp.asarray, memory.example_batch(cfg, workload, seed=0)))

    try:
        logs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    results = [json.loads(out.read_text()) for out in outs]
    rows = workload.batch * workload.group_size
    for r in results:
        assert (r["process_count"], r["global_devices"], r["local_devices"]) == (2, 8, 4)
        assert (r["local_rows"], r["global_rows"]) == (rows // 2, rows)
        np.testing.assert_allclose(r["loss"], reference["loss"], rtol=METRIC_RTOL)
        np.testing.assert_allclose(r["grad_norm"], reference["grad_norm"], rtol=METRIC_RTOL)
        np.testing.assert_allclose(r["sums"], reference["sums"], rtol=CHECKSUM_RTOL, atol=1e-5)
    assert reference["grad_norm"] > 1e-3


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    sys.path.insert(0, REPO)
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
