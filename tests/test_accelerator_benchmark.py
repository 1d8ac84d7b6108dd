"""`python -m benchmarks.accelerator` on the CPU in tiny mode: the JSON's fields, MFU and the
roofline fraction recomputed from the JSON's own numbers, and the bf16 check of the HLO (no
bf16 -> f32 upcast matmuls in the traced train step or decode step; and the check finds one
where there is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks.hlo_check import upcast_matmuls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator") / "table.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--tiny", "--out", str(out),
                             "--peak-tflops", "0.1", "--peak-gbs", "20", "--budget-s", "300"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| train-step MFU |" in result.stdout
    return json.loads(out.read_text())


def test_every_section_ran_without_error(table):
    for name in ("jax_train", "jax_prefill", "jax_decode", "decode_step", "torch_train", "torch_generate",
                 "jax_train_save_dots", "jax_decode_split", "jax_train_pallas", "decode_floor"):
        assert name in table and "error" not in table[name], (name, table.get(name))
    for impl in ("xla", "cudnn", "pallas"):
        assert "error" not in table["vision_paths"][impl], (impl, table["vision_paths"][impl])
    assert table["skipped"] == [] and table["tiny"] is True


def test_the_pallas_train_step_runs_the_gpu_kernel_and_matches_the_reference_step(table):
    """The 3B-shaped step's code path under --attention pallas (off GPU: the Triton kernel in
    interpret mode, inside remat): the warm-up step's gradient norm equals the reference
    step's (same weights, same batch) up to bf16 rounding."""
    pallas, reference = table["jax_train_pallas"], table["jax_train"]
    assert {"causal:pallas-gpu", "prefix:pallas-gpu", "segment:pallas-gpu"} <= set(pallas["attention"])
    assert pallas["first_step"]["grad_norm"] == pytest.approx(reference["first_step"]["grad_norm"], rel=0.02)
    assert pallas["first_step"]["grad_norm"] > 0


def test_vision_paths_record_what_ran_and_save_dots_keeps_more_for_the_backward(table):
    """On a CPU: cuDNN's row fell back to the reference, the Pallas row's frames went through
    the kernel with segment ids (interpret mode); save_dots keeps matmul outputs, so its program
    needs more memory than remat "full"."""
    vision = table["vision_paths"]
    assert vision["patches"] == 4 * (56 // 14) ** 2
    assert set(vision["cudnn"]["attention"]) == {"segment:xla"}
    assert vision["pallas"]["attention"] == {"segment:pallas-tpu": 2}  # the full and the window blocks' trace
    assert table["jax_train_save_dots"]["remat"] == "save_dots" and table["jax_train"]["remat"] == "full"
    assert table["jax_train_save_dots"]["peak_bytes_program"] > table["jax_train"]["peak_bytes_program"]


def test_mfu_is_model_flops_over_time_times_peak(table):
    train = table["jax_train"]
    assert train["peak_flops"] == pytest.approx(0.1e12)
    assert train["model_flops"] == train["model_flops_vision"] + train["model_flops_text"] > 0
    assert train["mfu"] == pytest.approx(train["model_flops"] / (train["step_s"] * train["peak_flops"]), rel=1e-9)


def test_decode_roofline_fraction_is_bytes_over_time_over_bandwidth(table):
    decode = table["jax_decode"]
    assert decode["roofline_fraction"] == pytest.approx(
        decode["bytes_per_step"] / decode["step_s"] / decode["peak_bandwidth"], rel=1e-9)
    assert decode["tokens_per_s"] == pytest.approx(decode["rows"] / decode["step_s"], rel=1e-9)
    assert table["jax_prefill"]["tokens_per_s"] > 0 and table["torch_generate"]["tokens_per_s"] > 0
    floor = table["decode_floor"]
    assert floor["roofline_fraction"] == pytest.approx(
        floor["bytes_per_step"] / floor["step_s"] / floor["peak_bandwidth"], rel=1e-9)
    # the floor's weights are the decoder's projections and the output projection: what the
    # model's decode step reads, less the norms, the embedding and the KV cache
    assert 0.8 * decode["bytes_per_step"] < floor["bytes_per_step"] < decode["bytes_per_step"]


def test_bf16_train_and_decode_steps_have_no_upcast_matmuls(table):
    """The traced programs (the model's own code; XLA:CPU itself runs bf16 dots in f32, so the
    compiled CPU program says nothing about a GPU's)."""
    for name in ("jax_train", "jax_decode", "decode_step"):
        assert table[name]["hlo"]["traced_upcasts"] == [], (name, table[name]["hlo"]["traced_upcasts"][:3])


def test_the_upcast_check_finds_a_bf16_matmul_done_in_f32():
    a, b = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16)
    upcast = jax.jit(lambda a, b: a.astype(jnp.float32) @ b.astype(jnp.float32)).lower(a, b)
    accumulate = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)).lower(a, b)
    assert len(upcast_matmuls(upcast.as_text(dialect="hlo"))) == 1
    assert upcast_matmuls(accumulate.as_text(dialect="hlo")) == []
    # autodiff of an f32-accumulating bf16 matmul: its backward upcasts (what layers.einsum_f32 avoids)
    grad = jax.jit(jax.grad(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).sum())).lower(a, b)
    assert len(upcast_matmuls(grad.as_text(dialect="hlo"))) == 1
