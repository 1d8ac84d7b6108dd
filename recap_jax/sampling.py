"""Jitted KV-cache generation for Qwen2.5-VL, and the trainer's log-probs of the same tokens.

`generate` prefills each multimodal prompt once (the vision tower and the prompt's forward
run once per prompt, not once per sample), keeps the prompt's KV cache once as a prefix shared
by its G samples (each sample's cache holds only its completion), then decodes every sample in
one compiled ``lax.while_loop`` with per-sequence EOS stopping.

Speed (a decode step is bound by reading the weights and the cache): each layer's cache buffer
is updated in place, the rotary tables of every step are computed once, tokens are drawn by
inverting the CDF (`sample_categorical`) rather than with V Gumbel draws, and on CPU the
decoder weights are sliced out of their layer stack once before the loop
(`TextModel.split_layers`: a transient copy of the decoder weights, which halves the bytes a
CPU decode step reads; accelerators, where the copy would cost scarce memory, slice per step;
`SPLIT_DECODER_WEIGHTS` chooses).

Log-probs. By default the returned per-token log-probs are ``log_softmax(logits)`` of the
model's raw logits: the distribution at temperature 1 without top-k/top-p truncation, whatever
temperature/top-p/top-k were used to *draw* the token. With
``SamplingParams.scale_logprobs=True`` they are ``log_softmax(logits / temperature)``, still
untruncated: TRL's (and the released RECAP code's) convention, whose trainer divides the
logits by the sampling temperature. The trainer (`completion_logprobs`, `make_logprob_fn`)
takes the same ``temperature`` (1.0 = unscaled), so with matching settings importance ratios
pi_theta / pi_old start at exactly 1 up to floating-point noise; a sampler that reported its
truncated distribution would bias every ratio. Greedy decoding (temperature 0) reports
temperature-1 log-probs in both conventions.

Static shapes: the prompt length is padded (on the left) up to a bucket from
``prompt_buckets`` and the vision patches up to a multiple of ``patch_bucket``, so a stream
of batches compiles a handful of times, not once per batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recap_jax.models.qwen2_5_vl import text as text_lib
from recap_jax.models.qwen2_5_vl.model import ModelInputs, prepare_inputs

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class SamplingParams(NamedTuple):
    """How tokens are drawn (static inside jit). temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | tuple[int, ...] = ()
    pad_token_id: int = 0
    num_samples: int = 1
    # True: the returned log-probs are log_softmax(logits / temperature) (TRL's convention,
    # what a trainer with make_logprob_fn(..., temperature=temperature) recomputes); False:
    # log_softmax(logits) at temperature 1. Greedy (temperature 0) is unscaled either way.
    scale_logprobs: bool = False

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples!r}")
        eos = (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id or ())
        return self._replace(eos_token_id=eos)


class GenerationOutput(NamedTuple):
    """Completions of B * G sequences (sample g of prompt b at row b * G + g).

    tokens: [B*G, max_new_tokens] int32, ``pad_token_id`` after the end;
    logprobs: [B*G, max_new_tokens] float32, log pi(token) at temperature 1, or at the sampling
      temperature with ``scale_logprobs`` (0 after the end);
    lengths: [B*G] int32, generated tokens including the EOS token;
    truncated: [B*G] bool, True when max_new_tokens was reached without an EOS.
    """

    tokens: Any
    logprobs: Any
    lengths: Any
    truncated: Any


# ----------------------------------------------------------------------------- drawing
def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Tempered logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # mass strictly before each sorted token; a token is kept while that mass < top_p
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_categorical(rng: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row from softmax(logits) [N, V] (-inf = never), by inverting the CDF.

    One uniform u per row, scaled to the total mass, instead of V Gumbel variables (what
    ``jax.random.categorical`` draws, which on CPU costs more than the model's output
    projection). The CDF is inverted in two levels to keep it O(V): the first block of
    ``block`` tokens whose cumulative mass exceeds u, then the first token in that block. A
    token of probability 0 never exceeds the running sum of the ones before it, so it is
    never drawn (when rounding leaves u past the block's own running sum, the block's last
    token of positive probability is taken).
    """
    rows, vocab = logits.shape
    blocks = -(-vocab // block)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * block - vocab))).reshape(rows, blocks, block)
    block_mass = jnp.sum(probs, axis=-1)  # [N, blocks]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1:]
    u = jax.random.uniform(rng, total.shape, jnp.float32) * total
    u = jnp.minimum(u, jnp.nextafter(total, jnp.zeros_like(total)))  # strictly below the total
    chosen = jnp.sum(block_cdf <= u, axis=-1, keepdims=True)  # [N, 1]: first block whose cdf > u
    before = jnp.take_along_axis(block_cdf - block_mass, chosen, axis=-1)
    in_block = jnp.take_along_axis(probs, chosen[:, :, None], axis=1)[:, 0]  # [N, block]
    offset = jnp.sum(before + jnp.cumsum(in_block, axis=-1) <= u, axis=-1)
    last_positive = block - 1 - jnp.argmax(in_block[:, ::-1] > 0, axis=-1)
    return chosen[:, 0] * block + jnp.minimum(offset, last_positive)


def logprob_temperature(params: SamplingParams) -> float:
    """The temperature the sampler's returned log-probs are at: the sampling temperature when
    ``scale_logprobs`` (and not greedy), else 1. A trainer passes it to `make_logprob_fn`."""
    return float(params.temperature) if params.scale_logprobs and params.temperature > 0 else 1.0


def draw_tokens(rng: jax.Array, logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(tokens [N], their log-probs under log_softmax(logits / `logprob_temperature`))."""
    if params.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = sample_categorical(rng, filter_logits(logits, params.temperature, params.top_k, params.top_p))
    scale = logprob_temperature(params)
    scaled = logits.astype(jnp.float32) if scale == 1.0 else logits.astype(jnp.float32) / scale
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- padding
def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"prompt length {length} exceeds the largest bucket {max(buckets)}")


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, length: int,
               pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves every prompt's real tokens to the right end of a [B, length] buffer."""
    batch = input_ids.shape[0]
    ids = np.full((batch, length), pad_token_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for b in range(batch):
        real = input_ids[b][attention_mask[b].astype(bool)]
        if len(real) > length:
            raise ValueError(f"prompt {b}: {len(real)} tokens exceed the prompt length {length}")
        if len(real):
            ids[b, length - len(real):] = real
            mask[b, length - len(real):] = 1
    return ids, mask


def prepare_prompts(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                    pad_token_id: int = 0, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                    patch_bucket: int = 1024, **vision_kwargs) -> ModelInputs:
    """Left-aligned, bucket-padded prompts with positions and vision inputs (host side)."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    length = bucket_length(int(mask.sum(-1).max()), prompt_buckets)
    ids, mask = left_align(ids, mask, length, pad_token_id)
    total = sum(len(p) for p in (pixel_values, vision_kwargs.get("pixel_values_videos")) if p is not None)
    num_patches = -(-total // patch_bucket) * patch_bucket if total else None
    return prepare_inputs(model.config, ids, mask, pixel_values, image_grid_thw, num_patches=num_patches,
                          **vision_kwargs)


# ----------------------------------------------------------------------------- decoding
def first_completion_position(inputs: ModelInputs) -> jax.Array:
    """[B, 1] M-RoPE position (all three rows) of the first generated token.

    transformers' rope delta is max_position + 1 - num_real_tokens, and generated text
    continues at num_real_tokens_so_far + delta, so the first completion token sits at
    max_position + 1 whatever the padding.
    """
    real = jnp.sum(inputs.attention_mask.astype(jnp.int32), axis=-1, keepdims=True)
    return real + inputs.rope_deltas.astype(jnp.int32)


# "auto" (split on CPU only), "always" or "never": whether the decode loop reads each decoder
# layer's weights from a copy made once before the loop. `generate_prepared` reads it at each
# call (a change compiles the sampler anew); the accelerator benchmark times both on a GPU
# (`benchmarks.accelerator`, section jax_decode_split).
SPLIT_DECODER_WEIGHTS = {"mode": "auto"}


def _split_weights_once() -> bool:
    """Whether to copy the decoder layers out of their stack before the decode loop (on CPU by
    default, see the module docstring; `SPLIT_DECODER_WEIGHTS`)."""
    mode = SPLIT_DECODER_WEIGHTS["mode"]
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"SPLIT_DECODER_WEIGHTS: mode {mode!r} is not one of auto, always, never")
    return mode == "always" or (mode == "auto" and jax.default_backend() == "cpu")


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for e in eos:
        hit = hit | (tokens == e)
    return hit


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _generate_jit(graphdef, state, inputs: ModelInputs, params: SamplingParams, rng: jax.Array,
                  split_weights: bool):
    """The sampler; ``split_weights``: `_split_weights_once` (static, so that a change retraces)."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = inputs.input_ids.shape
    samples = params.num_samples
    rows = batch * samples
    steps = params.max_new_tokens

    text = model.language_model
    layers = text.split_layers() if split_weights else None
    # the prompt's cache, kept once per prompt and shared by its G samples (the decode prefix)
    prompt_cache = text_lib.init_cache(model.config.text, batch, prompt_len, model.dtype)
    hidden, prompt_cache = text(model.embed(inputs), inputs.position_ids, inputs.attention_mask, prompt_cache,
                                layers=layers)
    first_logits = jnp.repeat(model.logits(hidden[:, -1]), samples, axis=0)
    # completion token j is fed at step j + 1 into slot j, at M-RoPE position start + j
    cache = text_lib.init_cache(model.config.text, rows, steps, model.dtype)
    start = jnp.repeat(first_completion_position(inputs), samples, axis=0)  # [rows, 1]
    offsets = jnp.broadcast_to((start + jnp.arange(steps)[None, :])[None], (3, rows, steps))
    cos_table, sin_table = text_lib.mrope_cos_sin(offsets, model.config.text)  # once, not per step and layer

    rng, draw_rng = jax.random.split(rng)
    token, logprob = draw_tokens(draw_rng, first_logits, params)
    tokens = jnp.full((rows, steps), params.pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((rows, steps), jnp.float32).at[:, 0].set(logprob)
    done = _is_eos(token, params.eos_token_id)
    lengths = jnp.ones((rows,), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, logprobs, done, lengths, rng = carry
        last = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # [rows, 1]
        positions = jax.lax.dynamic_slice_in_dim(offsets, step - 1, 1, axis=2)
        rotary = tuple(jax.lax.dynamic_slice_in_dim(t, step - 1, 1, axis=1) for t in (cos_table, sin_table))
        hidden, cache = text(text.embed(last), positions, jnp.ones((rows, 1), jnp.int32), cache, layers=layers,
                             prefix=prompt_cache, rotary=rotary)
        rng, draw_rng = jax.random.split(rng)
        token, logprob = draw_tokens(draw_rng, model.logits(hidden[:, 0]), params)
        token = jnp.where(done, params.pad_token_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(token, params.eos_token_id)
        return step + 1, cache, tokens, logprobs, done, lengths, rng

    carry = (jnp.ones((), jnp.int32), cache, tokens, logprobs, done, lengths, rng)
    _, _, tokens, logprobs, done, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(tokens, logprobs, lengths, ~done)


def generate(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id, rng: jax.Array,
             num_samples: int = 1, pad_token_id: int | None = None,
             prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, patch_bucket: int = 1024,
             **vision_kwargs) -> GenerationOutput:
    """Samples ``num_samples`` (G) completions per prompt; see the module docstring.

    Prompts may be left- or right-padded (``attention_mask`` marks real tokens); the inputs
    have transformers' names and meanings. ``eos_token_id``: an id or a list of ids.
    """
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    params = SamplingParams(max_new_tokens, float(temperature), float(top_p), int(top_k), eos_token_id,
                            int(pad_token_id), int(num_samples)).validate()
    inputs = prepare_prompts(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                             pad_token_id=pad_token_id, prompt_buckets=prompt_buckets, patch_bucket=patch_bucket,
                             **vision_kwargs)
    graphdef, state = nnx.split(model)
    return generate_prepared(graphdef, state, inputs, params, rng)


def generate_prepared(graphdef, state, inputs: ModelInputs, params: SamplingParams,
                      rng: jax.Array) -> GenerationOutput:
    """`generate` on prompts already prepared by `prepare_prompts`, for a model split into
    (graphdef, state): the form a training loop holds (the state is its params)."""
    return _generate_jit(graphdef, state, jax.tree.map(jnp.asarray, inputs), params.validate(), rng,
                         _split_weights_once())


# ----------------------------------------------------------------------------- scoring
@jax.custom_vjp
def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``take_along_axis(log_softmax(logits), tokens)`` [...] without the [..., V] log-softmax.

    logits: [..., V] float32; tokens: [...] int32. The forward is log_softmax's own formula
    (logit minus the max, minus log sum exp), so the values equal the gathered log_softmax; the
    backward writes d logits = g (onehot(token) - softmax(logits)) in one pass, where autodiff
    of the gather would scatter into a zeroed [..., V] buffer, then differentiate log_softmax.
    """
    return _token_logprobs_fwd(logits, tokens)[0]


def _shifted_log_normaliser(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _token_logprobs_fwd(logits, tokens):
    shifted, log_normaliser = _shifted_log_normaliser(logits)
    chosen = jnp.take_along_axis(shifted, tokens[..., None], axis=-1)
    return (chosen - log_normaliser)[..., 0], (shifted, log_normaliser, tokens)


def _token_logprobs_bwd(residuals, g):
    shifted, log_normaliser, tokens = residuals
    onehot = jnp.arange(shifted.shape[-1], dtype=tokens.dtype) == tokens[..., None]
    softmax = jnp.exp(shifted - log_normaliser)
    return g[..., None] * (onehot.astype(shifted.dtype) - softmax), None


token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_entropy(logits: jax.Array, differentiable: bool = False) -> jax.Array:
    """H = -sum_v p_v log p_v [...] of softmax(logits [..., V]). A metric by default (no
    gradient flows, so its backward costs nothing); ``differentiable``: the gradient flows
    into the logits (an entropy bonus in the loss)."""
    if not differentiable:
        logits = jax.lax.stop_gradient(logits)
    shifted, log_normaliser = _shifted_log_normaliser(logits)
    logp = shifted - log_normaliser
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not np.isfinite(temperature):
        raise ValueError(f"temperature: the log-prob temperature must be a finite number > 0 "
                         f"(1.0 = unscaled), got {temperature!r}")
    return float(temperature)


def completion_logprobs(model, inputs: ModelInputs, completions: jax.Array, completion_mask: jax.Array, *,
                        num_samples: int = 1, with_entropy: bool = False, logits_chunk: int = 0,
                        temperature: float = 1.0, entropy_gradient: bool = False):
    """The trainer's log pi(completion token) [B*G, C] (and optionally the entropy [B*G, C]).

    ``temperature`` T > 0: log-probs (and the entropy) of softmax(logits / T), as TRL's GRPO
    trainer computes them at the sampling temperature; 1.0 leaves the logits unscaled. It
    must equal the sampler's `logprob_temperature` for ratios to start at 1.

    inputs: B prompts as for `generate`; completions / completion_mask: [B*G, C], row b*G + g
    is sample g of prompt b. The prompt (vision tower included) runs through the model once,
    not once per sample: `TextModel.with_shared_prefix` gives the G completions of a prompt
    its keys and values, as the sampler's decode loop does, so the decoder's work on the
    prompt is not repeated G times. Completion token j sits at M-RoPE position
    `first_completion_position` + j in all three rows; token 0 is predicted by the prompt's
    last hidden state, token j > 0 by completion position j - 1. The entropy is a metric
    (computed under stop_gradient) unless ``entropy_gradient`` (an entropy bonus in the loss:
    its gradient flows into the params). ``logits_chunk`` > 0 projects onto the vocabulary that
    many completion positions at a time (`_chunked_token_stats`), trading one more output
    projection in the backward pass for [rows, chunk, V] logits instead of [rows, C, V].
    """
    temperature = _check_temperature(temperature)
    steps = completions.shape[1]
    completions = completions.astype(jnp.int32)
    offsets = jnp.repeat(first_completion_position(inputs), num_samples, axis=0) + jnp.arange(steps)[None, :]
    positions = jnp.broadcast_to(offsets[None], (3, *completions.shape)).astype(jnp.int32)
    text = model.language_model
    prompt_hidden, hidden = text.with_shared_prefix(model.embed(inputs), inputs.position_ids, inputs.attention_mask,
                                                    text.embed(completions), positions, completion_mask)
    predicting = jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], num_samples, axis=0), hidden[:, :-1]], axis=1)
    token_logp, entropy = _chunked_token_stats(model, predicting, completions, logits_chunk, temperature,
                                               entropy_gradient)
    real = completion_mask.astype(bool)
    token_logp = jnp.where(real, token_logp, 0.0)
    if not with_entropy:
        return token_logp
    return token_logp, jnp.where(real, entropy, 0.0)


def _token_stats(model, hidden: jax.Array, tokens: jax.Array, temperature: float = 1.0,
                 entropy_gradient: bool = False) -> tuple[jax.Array, jax.Array]:
    """(log pi(token), entropy) of softmax(logits / temperature) at ``hidden``'s positions."""
    logits = model.logits(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, tokens), token_entropy(logits, entropy_gradient)


def _chunked_token_stats(model, hidden: jax.Array, tokens: jax.Array, chunk: int,
                         temperature: float = 1.0, entropy_gradient: bool = False
                         ) -> tuple[jax.Array, jax.Array]:
    """(log pi(token), entropy), each [R, C], from hidden [R, C, E]: the output projection on
    ``chunk`` positions of every row at a time (0: all C at once), logits divided by
    ``temperature``.

    Chunks split the position axis, not the rows, so a row-sharded batch stays sharded inside
    each chunk. Each chunk is rematerialised: the backward pass recomputes its logits instead
    of keeping [R, C, V] of them (and of their softmax) alive, the largest buffers of a
    long-completion step with a 152k vocabulary.
    """
    rows, steps, width = hidden.shape
    if not chunk or chunk >= steps:
        return _token_stats(model, hidden, tokens, temperature, entropy_gradient)
    count = -(-steps // chunk)
    pad = count * chunk - steps
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(rows, count, chunk, width)
    tokens = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(rows, count, chunk)
    one_chunk = jax.checkpoint(lambda pieces: _token_stats(model, *pieces, temperature, entropy_gradient))
    logp, entropy = jax.lax.map(one_chunk, (hidden.swapaxes(0, 1), tokens.swapaxes(0, 1)))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(rows, count * chunk)[:, :steps]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def make_logprob_fn(graphdef, num_samples: int, logits_chunk: int = 0, temperature: float = 1.0,
                    entropy_gradient: bool = False):
    """The policy for `recap_jax.train_step.make_train_step`: ``logprob_fn(params, batch)``.

    ``batch["prompt"]`` holds the B prompts' `ModelInputs`, ``batch["completions"]`` and
    ``batch["completion_mask"]`` the B*G completions (row b*G + g = sample g of prompt b);
    ``params`` is ``nnx.state(model)`` of a model split into ``graphdef``. Log-probs are of
    softmax(logits / ``temperature``): 1.0 (default) matches the sampler's default log-probs;
    the sampling temperature (TRL's and the released code's convention) matches a sampler run
    with ``scale_logprobs=True`` (pass `logprob_temperature(params)`). ``logits_chunk``,
    ``entropy_gradient`` (True for an entropy bonus, GRPOConfig.entropy_coef > 0): see
    `completion_logprobs`.
    """
    temperature = _check_temperature(temperature)

    def logprob_fn(params, batch):
        model = nnx.merge(graphdef, params)
        return completion_logprobs(model, batch["prompt"], batch["completions"], batch["completion_mask"],
                                   num_samples=num_samples, with_entropy=True, logits_chunk=logits_chunk,
                                   temperature=temperature, entropy_gradient=entropy_gradient)

    return logprob_fn
