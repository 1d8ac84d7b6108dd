"""One attention function per use, with the implementation chosen by backend and setting.

Uses (each a function below, with the mask *described* rather than materialised where the
implementation allows):

* `causal_attention`: a sequence attending causally to itself, restricted to real tokens
  (training, prefill);
* `prefix_attention`: continuations that attend to a shared prefix's real keys, then
  causally to themselves (the G completions of a prompt, `TextModel.with_shared_prefix`);
* `segment_attention`: non-causal attention within segments (the vision tower: images of
  different sizes as segment ids; window blocks as segments of banded key blocks);
* `decode_attention`: one new token per row over a KV cache (and a shared prefix), reading
  only the filled part of the cache.

Implementations (`set_implementation` / `use_implementation`; read when a function is
traced, so a change clears jit caches):

* ``"xla"``: the reference, `layers.dot_product_attention` / `layers.cached_attention`
  (plain einsums, float32 scores, the whole score matrix). The CPU default.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused
  flash attention (GPU; bf16/fp16 only, head_dim a multiple of 8 and <= 256, sequence
  lengths even when a mask is given; GQA natively in the [B, S, H, D] layout). Masks are
  passed as boolean [B, 1, Sq, Sk] (cuDNN turns them into a bias). Anything cuDNN rejects
  at trace time falls back to ``"xla"`` (counted in `FALLBACKS`).
* ``"pallas"``: the backend's Pallas flash-attention kernel, taking segment ids instead of
  a mask (`pallas_kernel`): on TPU ``jax.experimental.pallas.ops.tpu.flash_attention``; on
  GPU the Triton kernel ``jax.experimental.pallas.ops.gpu.attention.mha``, which takes one
  segment-id array for queries and keys, so it serves self-attention (causal, the shared
  prefix with placeholder queries, the vision tower's frames) and the window blocks' banded
  keys go to cuDNN. Key/value heads are repeated for GQA and lengths padded to multiples of
  128. Off TPU and GPU it runs in interpret mode (slow; for tests).
* ``"auto"`` (default): ``"cudnn"`` on GPU, ``"pallas"`` on TPU, ``"xla"`` elsewhere.

Decoding: with ``"cudnn"`` or ``"pallas"`` named explicitly (and ``"auto"`` on TPU),
`decode_attention` walks the cache in chunks up to the query's slot with an online softmax
(`_chunked_decode`), so a step reads the prompt prefix and the filled slots only, not the
whole ``max_len`` buffer; ``"auto"`` on a GPU decodes over the whole buffer, which measured
faster at the sizes benchmarked (short caches pay more for the extra launches).

Masked-out rows: the fused paths express "real token" as segment id 1 and padding as 0, so
a padding *query* attends to padding keys instead of (as the reference) to nothing or to
earlier real keys. Rows of padding are never read by the model (their logits are not used
and real queries never attend to padding keys), so only real rows must, and do, match.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from recap_jax.models.qwen2_5_vl import layers

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_setting = {"implementation": "auto"}
# Tests only: run the "cudnn" branch off GPU through jax.nn's XLA implementation with the very
# arguments cuDNN would get (layout, GQA, masks), instead of falling back to the reference.
EMULATE_CUDNN = {"on": False}
# Tests only: which Pallas kernel "pallas" runs in interpret mode off TPU and GPU ("tpu" or "gpu").
PALLAS_KERNEL_OFF_ACCELERATOR = {"kernel": "tpu"}
# (use, requested implementation, reason) -> times a trace fell back to another implementation
FALLBACKS: collections.Counter = collections.Counter()
# (use, implementation) -> times a trace used it (what actually ran; benchmarks report it).
# The Pallas kernels are told apart: "pallas-tpu", "pallas-gpu".
USED: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------- selection
def set_implementation(name: str) -> None:
    """Selects the attention implementation for every later trace (see the module docstring).

    Clears jax's compilation caches when the choice changes: jitted functions key their cache
    on their arguments, not on this setting, and would otherwise keep the old kernels.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != _setting["implementation"]:
        _setting["implementation"] = name
        jax.clear_caches()


def get_implementation() -> str:
    return _setting["implementation"]


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """``with use_implementation("cudnn"): ...``: `set_implementation` for a block."""
    previous = get_implementation()
    set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def resolve(name: str | None = None, backend: str | None = None) -> str:
    """The concrete implementation (``xla``, ``cudnn`` or ``pallas``) that ``name`` (default:
    the current setting) means on ``backend`` (default: jax's default backend)."""
    name = get_implementation() if name is None else name
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = jax.default_backend() if backend is None else backend
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}.get(backend, "xla")


def pallas_kernel() -> str:
    """The Pallas kernel ``"pallas"`` runs here: ``"tpu"`` (flash_attention) or ``"gpu"``
    (the Triton ``mha``); off both, `PALLAS_KERNEL_OFF_ACCELERATOR` (interpret mode)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    return "gpu" if _on_gpu() else PALLAS_KERNEL_OFF_ACCELERATOR["kernel"]


def _fallback(use: str, implementation: str, reason: str, to: str = "xla") -> str:
    key = (use, implementation, reason)
    if not FALLBACKS[key]:
        warnings.warn(f"attention ({use}): {implementation} unavailable ({reason}); using {to}", stacklevel=3)
    FALLBACKS[key] += 1
    return to


# ---------------------------------------------------------------------------- masks
def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, 1, S, S] bool: query i attends key j <= i where ``valid`` [B, S] holds (the reference's mask)."""
    seq_len = valid.shape[1]
    return jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None] & valid[:, None, None, :]


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array, causal: bool) -> jax.Array:
    """[B, 1, Sq, Sk] bool: equal segment ids (and key <= query when ``causal``)."""
    mask = q_segments[:, None, :, None] == kv_segments[:, None, None, :]
    if causal:
        mask = mask & jnp.tril(jnp.ones((q_segments.shape[1], kv_segments.shape[1]), bool))[None, None]
    return mask


# ---------------------------------------------------------------------------- fused kernels
def _cudnn(q, k, v, mask, *, backend_impl: str = "cudnn") -> jax.Array:
    """jax.nn.dot_product_attention on [B, S, H, D] with a boolean mask [B, 1, Sq, Sk].

    Off GPU (tests, `EMULATE_CUDNN`) the very same call runs through jax's XLA implementation:
    the CPU's way of checking the arguments (layout, GQA, masks) that cuDNN receives on a GPU.
    """
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[1]))
    backend_impl = backend_impl if _on_gpu() else "xla"  # off GPU only when EMULATE_CUDNN is on
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=backend_impl)


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _cudnn_unsupported(dtype, head_dim: int, q_len: int, kv_len: int) -> str | None:
    """Why cuDNN's flash attention would reject these inputs (None = accepted), checked
    before tracing it so that the fallback is explicit."""
    if dtype not in (jnp.bfloat16, jnp.float16) and not EMULATE_CUDNN["on"]:  # jax.nn's XLA impl. takes any
        return f"dtype {dtype} (cuDNN takes bf16/fp16)"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim}"
    if q_len % 2 or kv_len % 2:
        return f"odd lengths {q_len}, {kv_len} with a mask"
    return None


_PALLAS_PAD_SEGMENT = np.iinfo(np.int32).min  # keys added to round lengths up; no real query matches it


def _pallas_block(length: int) -> int:
    """The kernel's block along a length that is a multiple of 128 (its segment-id masking
    needs kv blocks of whole 128-lane tiles, in interpret mode too)."""
    return next(block for block in (512, 256, 128) if length % block == 0)


def _pad_to(x: jax.Array, length: int, axis: int, value) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _pallas(q, k, v, q_segments, kv_segments, causal: bool) -> jax.Array:
    """The backend's Pallas kernel (`pallas_kernel`) on [B, S, H, D] with segment ids [B, S].
    The GPU kernel takes one id array: callers route only self-attention there, where
    ``q_segments`` equals ``kv_segments``."""
    if pallas_kernel() == "gpu":
        return _pallas_gpu(q, k, v, kv_segments, causal)
    return _pallas_tpu(q, k, v, q_segments, kv_segments, causal)


def _interpret_off_accelerators(kernel: str) -> None:
    """Off TPU and GPU, sets jax's process-wide TPU interpret mode for the ``kernel`` about to
    be traced: on for the TPU kernel (the only way it runs off TPU; process-wide, not a
    context, because its backward kernels are traced later, outside any context around the
    call), off for the GPU kernel (which the TPU mode would interpret as a TPU's; it takes
    its own ``interpret`` flag)."""
    if jax.default_backend() == "tpu" or _on_gpu():
        return
    from jax.experimental.pallas import tpu as pltpu

    if kernel == "tpu":
        pltpu.set_tpu_interpret_mode()
    else:
        pltpu.set_tpu_interpret_mode(None)


def _pallas_gpu(q, k, v, segments, causal: bool) -> jax.Array:
    """Pallas's GPU (Triton) flash attention on q, k, v [B, S, H(kv), D] with one segment-id
    array [B, S] for queries and keys and top-left causal masking; interpret mode off GPU.
    Returns [B, S, Hq, D].

    No mask is materialised: the kernel compares ids per block. The length is padded up to a
    multiple of 128 (its block) with an id no real token has, so added queries attend only to
    added keys and are dropped.
    """
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    length = q.shape[1]
    padded = -(-length // 128) * 128
    segments = _pad_to(segments.astype(jnp.int32), padded, 1, _PALLAS_PAD_SEGMENT)
    q, k, v = (_pad_to(x, padded, 1, 0) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    _interpret_off_accelerators("gpu")
    out = gpu_attention.mha(q, k, v, segments, sm_scale=q.shape[-1] ** -0.5, causal=causal,
                            interpret=not _on_gpu())
    return out[:, :length]


def _pallas_tpu(q, k, v, q_segments, kv_segments, causal: bool) -> jax.Array:
    """The Pallas TPU flash-attention kernel on [B, S, H, D] inputs with segment ids [B, S]
    (int32) and top-left causal masking; interpret mode off TPU. Returns [B, Sq, Hq, D].

    Lengths are padded up to multiples of 128: added keys take a segment id no query has;
    added queries take key 0's id (so that each has a key, causal or not) and are dropped.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    q_len, kv_len = q.shape[1], k.shape[1]
    q_pad, kv_pad = -(-q_len // 128) * 128, -(-kv_len // 128) * 128
    q_segments, kv_segments = q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32)
    q_segments = jnp.concatenate([q_segments, jnp.broadcast_to(kv_segments[:, :1], (q.shape[0], q_pad - q_len))], 1)
    kv_segments = _pad_to(kv_segments, kv_pad, 1, _PALLAS_PAD_SEGMENT)
    q, k, v = _pad_to(q, q_pad, 1, 0), _pad_to(k, kv_pad, 1, 0), _pad_to(v, kv_pad, 1, 0)
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3) for x in (k, v))
    bq, bk = _pallas_block(q_pad), _pallas_block(kv_pad)
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                          block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                          block_k_dq=bk, block_q_dq=bq)
    _interpret_off_accelerators("tpu")
    out = fa.flash_attention(q.transpose(0, 2, 1, 3), k, v, segment_ids=fa.SegmentIds(q=q_segments, kv=kv_segments),
                             causal=causal, sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def _choose(use: str, q, q_len: int, kv_len: int, implementation: str | None, self_attention: bool = True) -> str:
    """The implementation this call runs: the resolved setting, or another where the kernel
    would reject the call: the GPU Pallas kernel anything but self-attention (to cuDNN),
    cuDNN queries like ``q`` (dtype, head_dim) with these lengths (to ``xla``)."""
    impl = resolve(implementation)
    if impl == "pallas" and pallas_kernel() == "gpu" and not self_attention:
        impl = _fallback(use, impl, "the GPU kernel takes one segment-id array for queries and keys", to="cudnn")
    if impl == "cudnn":
        why = _cudnn_unsupported(q.dtype, q.shape[-1], q_len, kv_len)
        if why is None and not _on_gpu() and not EMULATE_CUDNN["on"]:
            why = f"backend {jax.default_backend()}"
        if why is not None:
            impl = _fallback(use, impl, why)
    USED[(use, f"pallas-{pallas_kernel()}" if impl == "pallas" else impl)] += 1
    return impl


# ---------------------------------------------------------------------------- the uses
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                     implementation: str | None = None) -> jax.Array:
    """Causal self-attention restricted to real keys.

    q [B, S, Hq, D]; k, v [B, S, Hkv, D]; valid [B, S] bool (padding anywhere). Real
    queries equal the reference `layers.dot_product_attention(q, k, v, causal_mask(valid))`.
    """
    impl = _choose("causal", q, q.shape[1], k.shape[1], implementation)
    if impl == "cudnn":
        return _cudnn(q, k, v, causal_mask(valid))
    if impl == "pallas":
        segments = valid.astype(jnp.int32)
        return _pallas(q, k, v, segments, segments, causal=True)
    return layers.dot_product_attention(q, k, v, causal_mask(valid))


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array,
                      kv_segments: jax.Array | None = None, *, implementation: str | None = None) -> jax.Array:
    """Non-causal attention between equal segment ids.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D]; q_segments [B, Sq], kv_segments [B, Sk] int, or
    None for self-attention (Sq = Sk, the keys' ids are the queries': what the GPU Pallas
    kernel takes). Every query must share its id with at least one key (true of
    self-attention); equals the reference on every row.
    """
    self_attention = kv_segments is None
    kv_segments = q_segments if self_attention else kv_segments
    impl = _choose("segment", q, q.shape[1], k.shape[1], implementation, self_attention=self_attention)
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_mask(q_segments, kv_segments, causal=False))
    if impl == "pallas":
        return _pallas(q, k, v, q_segments, kv_segments, causal=False)
    return layers.dot_product_attention(q, k, v, segment_mask(q_segments, kv_segments, causal=False))


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, prefix_k: jax.Array,
                     prefix_v: jax.Array, prefix_valid: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Continuations attending to their shared prefix's real keys, then causally to their own.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; valid [B, T]; prefix_k, prefix_v [Bp, P, Hkv, D]
    shared by groups of B / Bp consecutive rows (row r continues prefix r // (B / Bp));
    prefix_valid [Bp, P]. The reference is `layers.cached_attention` with its ``prefix``
    (the prefix's keys read once per group). The fused paths repeat the prefix's keys and
    values per row (small: P x Hkv x D per row) and attend to [prefix, own] keys: cuDNN with
    the reference's mask; Pallas with P placeholder queries in front, so that top-left causal
    masking lets query i see every prefix key (their outputs are dropped).
    """
    keys_len = prefix_k.shape[1] + k.shape[1]  # pallas also runs that many queries (placeholders)
    impl = _choose("prefix", q, q.shape[1] if resolve(implementation) == "cudnn" else keys_len, keys_len,
                   implementation)
    if impl == "xla":
        return layers.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), causal_mask(valid),
                                       (prefix_k.transpose(0, 2, 3, 1), prefix_v.transpose(0, 2, 1, 3), prefix_valid))
    share = q.shape[0] // prefix_k.shape[0]
    prefix_len, length = prefix_k.shape[1], q.shape[1]
    rows_prefix_valid = jnp.repeat(prefix_valid, share, axis=0)
    keys = jnp.concatenate([jnp.repeat(prefix_k, share, axis=0), k], axis=1)
    values = jnp.concatenate([jnp.repeat(prefix_v, share, axis=0), v], axis=1)
    if impl == "cudnn":
        prefix_mask = jnp.broadcast_to(rows_prefix_valid[:, None, None, :], (q.shape[0], 1, length, prefix_len))
        mask = jnp.concatenate([prefix_mask, causal_mask(valid)], axis=-1)
        return _cudnn(q, keys, values, mask)
    kv_segments = jnp.concatenate([rows_prefix_valid, valid], axis=1).astype(jnp.int32)
    placeholders = jnp.zeros((q.shape[0], prefix_len, *q.shape[2:]), q.dtype)
    # placeholder i shares key i's segment, so it always has a key to attend to (finite rows)
    q_segments = jnp.concatenate([kv_segments[:, :prefix_len], valid.astype(jnp.int32)], axis=1)
    out = _pallas(jnp.concatenate([placeholders, q], axis=1), keys, values, q_segments, kv_segments, causal=True)
    return out[:, prefix_len:]


def decode_attention(q: jax.Array, keys_t: jax.Array, values: jax.Array, cache_valid: jax.Array, index: jax.Array,
                     prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None, *,
                     implementation: str | None = None) -> jax.Array:
    """One query per row at cache slot ``index`` over the cache's slots <= index (and a prefix).

    q [B, 1, Hq, D]; keys_t [B, Hkv, D, L], values [B, Hkv, L, D] (the cache's layouts, the
    new token already written); cache_valid [B, L] bool; index: int32 scalar, the query's
    slot; prefix: None or (keys_t [Bp, Hkv, D, P], values [Bp, Hkv, P, D], valid [Bp, P]) as
    in `layers.cached_attention`. ``xla``: the reference over the whole buffer; otherwise
    `_chunked_decode`, which reads only the chunks up to ``index``.
    """
    impl = resolve(implementation)
    # "auto" on a GPU decodes over the whole buffer: on an H200 at a 512-token prompt and 128
    # new tokens that step took 6.4 ms against 8.0 ms chunked (benchmarks/RESULTS.md); the
    # chunked reader is for long caches (ask for it with "cudnn")
    whole_buffer = impl == "xla" or (impl == "cudnn" and (implementation or get_implementation()) == "auto")
    USED[("decode", "xla" if whole_buffer else "chunked")] += 1
    if whole_buffer:
        slots = jnp.arange(keys_t.shape[-1])
        mask = cache_valid[:, None, None, :] & (slots <= index)[None, None, None, :]
        return layers.cached_attention(q, keys_t, values, mask, prefix)
    return _chunked_decode(q, keys_t, values, cache_valid, index, prefix)


def decode_chunk(length: int) -> int:
    """The chunk `_chunked_decode` reads the cache in: the largest of 512 ... 8 dividing
    ``length`` (whole buffer if none does)."""
    return next((c for c in (512, 256, 128, 64, 32, 16, 8) if length % c == 0), length)


def _chunked_decode(q, keys_t, values, cache_valid, index, prefix):
    """Online-softmax attention over the prefix, then the cache's chunks 0 .. index // chunk.

    A ``fori_loop`` with a traced trip count reads only the filled chunks (static shapes
    per chunk); scores, running max and sum are float32, as in the reference. Not
    differentiable (decoding only).
    """
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads, length = keys_t.shape[1], keys_t.shape[3]
    groups = num_heads // num_kv_heads
    qh = q.reshape(batch, num_kv_heads, groups, head_dim)
    scale = head_dim ** -0.5
    neg = jnp.finfo(jnp.float32).min

    def accumulate(state, scores, vals):  # scores [B, Hkv, G, n] f32 (masked), vals [B, Hkv, n, D]
        m, s, acc = state
        m_new = jnp.maximum(m, scores.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        acc = acc * correction[..., None] + jnp.einsum("bhgk,bhkd->bhgd", p.astype(vals.dtype), vals,
                                                       preferred_element_type=jnp.float32)
        return m_new, s * correction + p.sum(-1), acc

    state = (jnp.full((batch, num_kv_heads, groups), neg, jnp.float32),
             jnp.zeros((batch, num_kv_heads, groups), jnp.float32),
             jnp.zeros((batch, num_kv_heads, groups, head_dim), jnp.float32))
    if prefix is not None:
        prefix_keys_t, prefix_values, prefix_valid = prefix
        bp = prefix_keys_t.shape[0]
        share = batch // bp
        qg = qh.reshape(bp, share, num_kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
        qg = qg.reshape(bp, num_kv_heads, share * groups, head_dim)
        scores = jnp.einsum("bhmd,bhdk->bhmk", qg, prefix_keys_t.astype(q.dtype),
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(prefix_valid[:, None, None, :], scores, neg)
        m = scores.max(-1)
        p = jnp.exp(scores - m[..., None])
        acc = jnp.einsum("bhmk,bhkd->bhmd", p.astype(values.dtype), prefix_values.astype(values.dtype),
                         preferred_element_type=jnp.float32)

        def rows(x):  # [Bp, Hkv, share * G, ...] -> [B, Hkv, G, ...]
            x = x.reshape(bp, num_kv_heads, share, groups, *x.shape[3:])
            return jnp.moveaxis(x, 2, 1).reshape(batch, num_kv_heads, groups, *x.shape[4:])

        state = (rows(m), rows(p.sum(-1)), rows(acc))

    chunk = decode_chunk(length)

    def body(i, state):
        start = i * chunk
        k_chunk = jax.lax.dynamic_slice_in_dim(keys_t, start, chunk, axis=3)
        v_chunk = jax.lax.dynamic_slice_in_dim(values, start, chunk, axis=2)
        ok = jax.lax.dynamic_slice_in_dim(cache_valid, start, chunk, axis=1) & (start + jnp.arange(chunk) <= index)
        scores = jnp.einsum("bhgd,bhdk->bhgk", qh, k_chunk, preferred_element_type=jnp.float32) * scale
        return accumulate(state, jnp.where(ok[:, None, None, :], scores, neg), v_chunk)

    _, total, acc = jax.lax.fori_loop(0, index // chunk + 1, body, state)
    out = acc / total[..., None]
    return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype)


# ---------------------------------------------------------------------------- numpy reference
def numpy_attention(q, k, v, mask) -> np.ndarray:
    """Float64 numpy softmax attention (tests): q [B, Sq, Hq, D], k, v [B, Sk, Hkv, D], mask
    broadcastable to [B, Hq, Sq, Sk]; rows with nothing to attend get a uniform distribution."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = np.broadcast_to(np.asarray(mask), scores.shape)
    scores = np.where(mask, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)
