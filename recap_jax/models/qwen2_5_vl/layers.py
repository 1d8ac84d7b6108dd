"""Building blocks shared by the vision tower and the text decoder.

Conventions
* Every parameter is an ``nnx.Param`` whose metadata ``logical_axes`` names its axes
  (``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``vision_embed``, ...). The
  mapping from logical names to mesh axes lives in ``recap_jax.parallel``.
* Repeated blocks are *stacked*: a block module built with ``stack=L`` holds every
  parameter with a leading ``layers`` axis, and `scan_layers` runs it with ``jax.lax.scan``
  (one compiled body, whatever the depth).
* ``dtype`` is the compute dtype; parameters keep their own dtype and are cast on use.
  Normalisation statistics and softmax are always computed in float32.
* A kernel's value may be an `AdaptedKernel` instead of an array (LoRA with dropout, built by
  ``recap_jax.lora`` for the training forward only): modules read it as they read an array
  (``self.kernel[...].astype(dtype)``) and `matmul` applies it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS_AXIS = "layers"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one transformers checkpoint tensor maps onto one of our parameters.

    hf_name: the tensor's name relative to its module's prefix; for stacked blocks it
      contains ``{i}`` for the layer index (e.g. ``"layers.{i}.self_attn.q_proj.weight"``).
    path: our parameter's path relative to the module (e.g. ``("layers", "self_attn", "q_proj", "kernel")``).
    to_ours / to_hf: layout conversions of ONE layer's tensor (numpy in, numpy out).
    stacked: whether our parameter has a leading ``layers`` axis filled from ``{i}`` = 0..L-1.
    """

    hf_name: str
    path: tuple[str, ...]
    to_ours: Callable[[Any], Any]
    to_hf: Callable[[Any], Any]
    stacked: bool = False


def variable_at(module: nnx.Module, path: Sequence[str]) -> nnx.Variable:
    """The parameter at ``path`` (attribute names) inside ``module``."""
    node = module
    for name in path:
        node = getattr(node, name)
    return node


def load_from_specs(module: nnx.Module, specs: Sequence[TensorSpec], tensors: Mapping[str, Any], num_layers: int,
                    *, prefix: str = "", what: str = "weights") -> None:
    """Fills ``module`` in place from transformers-named tensors (a small, in-memory loader
    for tests and tools; checkpoint.py is the streaming, sharded one).

    Every spec'd tensor must be present (KeyError naming it); a converted tensor of the wrong
    shape is a ValueError; a tensor under ``prefix`` that no spec names is a ValueError too
    (it would otherwise be dropped silently).
    """
    used = set()

    def fetch(name: str) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            raise KeyError(f"{what}: missing tensor {key!r}")
        used.add(key)
        return np.asarray(tensors[key])

    for spec in specs:
        if spec.stacked:
            value = np.stack([spec.to_ours(fetch(spec.hf_name.format(i=i))) for i in range(num_layers)])
        else:
            value = spec.to_ours(fetch(spec.hf_name))
        variable = variable_at(module, spec.path)
        if value.shape != variable.shape:
            raise ValueError(f"{what}: {prefix + spec.hf_name} maps to shape {value.shape}, "
                             f"but {'.'.join(spec.path)} has shape {variable.shape}")
        variable.set_value(jnp.asarray(value, variable.dtype))
    unknown = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if unknown:
        raise ValueError(f"{what}: tensors with no counterpart in the model: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")


def export_to_specs(module: nnx.Module, specs: Sequence[TensorSpec], num_layers: int, *,
                    prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `load_from_specs`: transformers-named numpy tensors of ``module``."""
    out = {}
    for spec in specs:
        value = np.asarray(variable_at(module, spec.path)[...])
        if spec.stacked:
            for i in range(num_layers):
                out[prefix + spec.hf_name.format(i=i)] = spec.to_hf(value[i])
        else:
            out[prefix + spec.hf_name] = spec.to_hf(value)
    return out


def make_param(key: jax.Array, shape: Sequence[int], logical_axes: Sequence[str | None], *,
               dtype: Any, stack: int | None = None, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter of ``shape`` (with a leading ``stack`` axis when stacked) and its axis names."""
    shape = tuple(shape)
    axes = tuple(logical_axes)
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match shape {shape}")
    if stack is not None:
        shape = (stack, *shape)
        axes = (LAYERS_AXIS, *axes)
    if init == "normal":
        value = std * jax.random.normal(key, shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated and returned in float32, whose backward runs its
    two matmuls in the operands' own dtype.

    Why: autodiff of an einsum with ``preferred_element_type=float32`` on bf16 operands meets
    a float32 cotangent and promotes the other operand to float32, so the backward of the
    attention scores and of the output projection ran as float32 matmuls (a sixteenth of a
    GPU's bf16 rate), found by `benchmarks.hlo_check.upcast_matmuls`. Here the cotangent is
    rounded to the operands' dtype first (as a bf16 model's every other gradient is); for
    float32 operands this is exactly the plain einsum's gradient.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, cotangent):
    a, b = residuals
    _, pullback = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return pullback(cotangent.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def matmul(x: jax.Array, kernel: Any, contract: int = 1, preferred_element_type: Any = None) -> jax.Array:
    """x [..., *K] times kernel [*K, *N] -> [..., *N], contracting x's last ``contract`` axes with
    kernel's first ``contract``, as ONE 2-D matmul [rows, prod K] x [prod K, prod N].
    ``kernel`` may be an `AdaptedKernel` (LoRA with dropout on the adapter's input).

    Why 2-D: with extra leading (batch, sequence) or trailing (heads, head_dim) axes, XLA:CPU
    lowers the backward's kernel gradient (a contraction over several axes) to a generic dot
    behind a transposing copy; flattened, every matmul of forward and backward takes its fast
    path (a text MLP's forward + backward: ~25% faster on a 2-core AVX2 host).
    """
    if isinstance(kernel, AdaptedKernel):
        return kernel.apply(x, contract, preferred_element_type)
    k_shape, n_shape = kernel.shape[:contract], kernel.shape[contract:]
    lead = x.shape[:x.ndim - contract]
    if x.shape[x.ndim - contract:] != k_shape:
        raise ValueError(f"matmul: x {x.shape} does not end in kernel's contracted axes {k_shape}")
    k_size = int(np.prod(k_shape))
    x2, kernel2 = x.reshape(-1, k_size), kernel.reshape(k_size, -1)
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) == jnp.float32:
        y = einsum_f32("mk,kn->mn", x2, kernel2)  # bf16 backward matmuls (see einsum_f32)
    else:
        y = jnp.dot(x2, kernel2, preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *n_shape)


_ADAPTER_SCOPES = threading.local()  # .tables: the stack of `adapter_scope` use tables


@contextlib.contextmanager
def adapter_scope():
    """Where a forward with `AdaptedKernel`s is traced (``lora.wrap_logprob_fn`` opens it):
    inside, the n-th matmul with one kernel (n = 0, 1, ... in trace order, counted per key)
    draws its dropout mask from ``fold_in(key, n)``, as linen's ``make_rng`` counts its calls.

    Why count: the decoder's `with_shared_prefix` applies each projection twice (prompts,
    then completions) and a module reads a fresh copy of its kernel at every access, so only
    the key itself (the same array object in every copy) identifies the kernel. Tracing is
    deterministic, so the numbers, and the masks, are a function of the key.
    """
    tables = _ADAPTER_SCOPES.__dict__.setdefault("tables", [])
    tables.append({})
    try:
        yield tables[-1]
    finally:
        tables.pop()


def _next_use(key: jax.Array) -> int:
    tables = getattr(_ADAPTER_SCOPES, "tables", None)
    if not tables:
        raise RuntimeError("AdaptedKernel: a matmul outside layers.adapter_scope() (open it around "
                           "the forward, as lora.wrap_logprob_fn does)")
    entry = tables[-1].setdefault(id(key), [key, 0])  # holding the key keeps its id unique
    entry[1] += 1
    return entry[1] - 1


@jax.tree_util.register_pytree_node_class
class AdaptedKernel:
    """A kernel W [*K, *N] with a LoRA adapter kept apart, for a training forward with dropout
    on the adapter's input: `matmul` computes

        y = x W + scale * (dropout(x) A) B        A [*K, r], B [r, *N]

    where dropout zeroes each element of x with probability ``rate`` and scales the others by
    1 / (1 - rate) (inverted dropout, as PyTorch's and PEFT's). W, A, B may carry a leading
    ``layers`` axis and ``key`` then holds one PRNG key per layer, so `scan_layers` slices
    them all like any stacked parameter. Each use of the kernel draws its own mask
    (`adapter_scope`): the prompts' and the completions' projections get independent ones.
    """

    def __init__(self, w: jax.Array, a: jax.Array, b: jax.Array, key: jax.Array, scale: float,
                 rate: float):
        if not 0 < rate < 1:
            raise ValueError(f"AdaptedKernel: dropout rate={rate!r}; need 0 < rate < 1")
        self.w, self.a, self.b, self.key = w, a, b, key
        self.scale, self.rate = float(scale), float(rate)

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.key), (self.scale, self.rate)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    def __getitem__(self, index):  # ``variable[...]`` reads the whole value, as of an array
        if index is not Ellipsis:
            raise TypeError(f"AdaptedKernel: only [...] reads are supported, got [{index!r}]")
        return self

    def astype(self, dtype: Any) -> AdaptedKernel:
        """W, A, B in ``dtype`` (the compute dtype); the same key."""
        return AdaptedKernel(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype),
                             self.key, self.scale, self.rate)

    def apply(self, x: jax.Array, contract: int, preferred_element_type: Any = None) -> jax.Array:
        """x W + scale * (dropout(x) A) B (see the class docstring); x's dtype throughout."""
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, _next_use(self.key)), 1.0 - self.rate,
                                    x.shape)
        dropped = jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), jnp.zeros((), x.dtype))
        adapter = matmul(matmul(dropped, self.a, contract), self.b)
        y = matmul(x, self.w, contract, preferred_element_type)
        return y + (adapter * jnp.asarray(self.scale, adapter.dtype)).astype(y.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of PyTorch's weight)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 axes: tuple[str | None, str | None], rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
                 stack: int | None = None, std: float = 0.02):
        self.kernel = make_param(rngs.params(), (in_features, out_features), axes, dtype=param_dtype,
                                 stack=stack, std=std)
        self.bias = (make_param(rngs.params(), (out_features,), axes[1:], dtype=param_dtype, stack=stack,
                                init="zeros") if use_bias else None)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        y = matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, with the statistics in float32 (as transformers' Qwen2RMSNorm)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32, stack: int | None = None):
        del rngs
        self.eps = eps
        self.scale = make_param(None, (dim,), (axis_name,), dtype=param_dtype, stack=stack, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(input_dtype) * normed.astype(input_dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the MLP of both towers (biases only in the vision tower)."""

    def __init__(self, dim: int, hidden: int, *, use_bias: bool, embed_axis: str, mlp_axis: str,
                 rngs: nnx.Rngs, param_dtype: Any = jnp.float32, stack: int | None = None):
        kw = dict(use_bias=use_bias, rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.gate_proj = Linear(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.up_proj = Linear(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.down_proj = Linear(hidden, dim, axes=(mlp_axis, embed_axis), **kw)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x, dtype)) * self.up_proj(x, dtype), dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, computed in float32 and cast back to x's dtype.

    cos/sin broadcast against x ([..., seq, heads, head_dim] with cos [..., seq, 1, head_dim]).
    """
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped-query heads.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Hq a multiple of Hkv;
    mask: boolean, broadcastable to [B, Hq, Sq, Sk] (True = may attend), or None.
    Scores and softmax are float32; a query with nothing to attend to gets a uniform
    (finite) distribution instead of NaN. Returns [B, Sq, Hq, D] in q's dtype.

    Computed as `cached_attention` on heads-major keys and values: transposing k and v
    ([B, Sk, ...], linear in Sk) lets the scores come out of the matmul as [.., Sq, Sk]; left
    to itself XLA:CPU produced them as [.., Sk, Sq] and transposed every [Sq, Sk] block
    (the largest cost of the vision tower's attention).
    """
    return cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)


def _apply_mask(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``where(mask, scores, finfo.min)`` for float32 scores, written as a clamped additive bias:
    bit-identical for finite scores, and XLA:CPU fuses it into far cheaper code than a select
    on a broadcast mask (a third of the vision tower's time, where Sq = Sk = all patches)."""
    neg = jnp.finfo(jnp.float32).min
    return jnp.maximum(scores + jnp.where(mask, 0.0, neg), neg)


def _grouped_mask(mask: jax.Array, batch: int, num_kv_heads: int, groups: int, q_len: int, kv_len: int) -> jax.Array:
    """A mask broadcastable to [B, Hkv * G, Sq, Sk] as one broadcastable to [B, Hkv, G, Sq, Sk]
    (the query rows of `cached_attention`, split: row g * Sq + i is query i of head g of the group).

    A mask shared by all heads ([B or 1, 1, Sq, Sk], the usual case) only gains two unit axes:
    it is never materialised per head or per group member (a G-fold copy of a float32 bias of
    [Sq, Sk] was 1.2 GiB per device of the 7B plan).
    """
    mask = jnp.asarray(mask)
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask[:, :, None]
    mask = jnp.broadcast_to(mask, (batch, num_kv_heads * groups, q_len, kv_len))
    return mask.reshape(batch, num_kv_heads, groups, q_len, kv_len)


def cached_attention(q: jax.Array, keys_t: jax.Array, values: jax.Array, mask: jax.Array | None,
                     prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """`dot_product_attention` over a KV cache's layout, optionally after a shared prefix.

    q: [B, Sq, Hq, D]; keys_t: [B, Hkv, D, Sk] (transposed); values: [B, Hkv, Sk, D];
    mask: boolean, broadcastable to [B, Hq, Sq, Sk], or None.
    prefix: None, or (keys_t [Bp, Hkv, D, P], values [Bp, Hkv, P, D], mask [Bp, P] bool)
      of P slots shared by groups of B / Bp consecutive rows (row r reads prefix row
      r // (B / Bp)), attended before the row's own slots: one softmax over P + Sk keys.
      The G samples of one prompt share its cache this way, so decoding reads the prompt's
      keys once per prompt, not once per sample.

    The G * Sq queries of each KV head (times B / Bp for the prefix) are the rows of plain
    batched matmuls, [rows, D] x [D, keys] then [rows, keys] x [keys, D]: the layouts
    XLA:CPU's matmul kernels read without packing or transposing the cache. Scores and
    softmax are float32, as in `dot_product_attention`. Returns [B, Sq, Hq, D].
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = keys_t.shape[1], keys_t.shape[3]
    rows = num_heads // num_kv_heads * q_len
    qh = q.reshape(batch, q_len, num_kv_heads, rows // q_len, head_dim).transpose(0, 2, 3, 1, 4)
    qh = qh.reshape(batch, num_kv_heads, rows, head_dim)
    scores = einsum_f32("bhmd,bhdk->bhmk", qh, keys_t) * (head_dim ** -0.5)
    if mask is not None:
        groups = rows // q_len
        split = scores.reshape(batch, num_kv_heads, groups, q_len, kv_len)
        split = _apply_mask(split, _grouped_mask(mask, batch, num_kv_heads, groups, q_len, kv_len))
        scores = split.reshape(batch, num_kv_heads, rows, kv_len)
    if prefix is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bhmk,bhkd->bhmd", probs, values)  # [B, Hkv, G * Sq, D]
    else:
        out = _attend_after_prefix(qh, scores, values, prefix)
    out = out.reshape(batch, num_kv_heads, rows // q_len, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)


def _attend_after_prefix(qh: jax.Array, scores: jax.Array, values: jax.Array,
                         prefix: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """`cached_attention`'s weighted values over the prefix's slots then the rows' own slots.

    qh: [B, Hkv, M, D] query rows; scores: [B, Hkv, M, Sk] (own slots, scaled and masked);
    values: [B, Hkv, Sk, D]. The prefix's queries are regrouped so that the B / Bp rows of a
    group form one matmul against their shared prefix. Returns [B, Hkv, M, D].
    """
    prefix_keys_t, prefix_values, prefix_mask = prefix
    batch, num_kv_heads, rows, head_dim = qh.shape
    groups, prefix_len = prefix_keys_t.shape[0], prefix_keys_t.shape[3]
    share = batch // groups

    def to_groups(x):  # [B, Hkv, M, n] -> [Bp, Hkv, share * M, n]
        x = x.reshape(groups, share, num_kv_heads, rows, x.shape[-1]).transpose(0, 2, 1, 3, 4)
        return x.reshape(groups, num_kv_heads, share * rows, x.shape[-1])

    def from_groups(x):  # the inverse of to_groups
        x = x.reshape(groups, num_kv_heads, share, rows, x.shape[-1]).transpose(0, 2, 1, 3, 4)
        return x.reshape(batch, num_kv_heads, rows, x.shape[-1])

    prefix_scores = einsum_f32("bhmd,bhdk->bhmk", to_groups(qh), prefix_keys_t) * (head_dim ** -0.5)
    prefix_scores = _apply_mask(prefix_scores, prefix_mask[:, None, None, :])
    probs = jax.nn.softmax(jnp.concatenate([from_groups(prefix_scores), scores], axis=-1), axis=-1)
    probs = probs.astype(values.dtype)
    prefix_out = jnp.einsum("bhmk,bhkd->bhmd", to_groups(probs[..., :prefix_len]), prefix_values)
    return from_groups(prefix_out) + jnp.einsum("bhmk,bhkd->bhmd", probs[..., prefix_len:], values)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_layers(stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                xs: Any = None, *, remat: str = "none") -> tuple[Any, Any]:
    """Runs ``body(layer, carry, x) -> (carry, y)`` over the layers of a stacked module.

    ``xs`` (optional) holds per-layer inputs with a leading layer axis (e.g. a KV cache or a
    full-attention flag); ``remat`` is a key of `REMAT_POLICIES`.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: {remat!r} is not one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(stacked)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))
