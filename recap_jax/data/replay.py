"""Replay buffer on tf.data: one pipeline per source, mixed by a strategy, resumable exactly.

    replay = make_replay(sources, processor, model_config, ReplayConfig(strategy="uniform"))
    batch = next(replay)          # dict of numpy arrays, layout in recap_jax.data.encode.collate
    state = replay.state()        # small JSON-able dict; save it with the checkpoint
    replay = make_replay(sources, processor, model_config, config, state=state)  # continues

Per source (a `sources.Source`, a `synthetic.SyntheticSource`, or anything with ``name``,
``len``, ``load(i) -> Record``, ``where(i)``, ``blocks``): an infinite stream of positions
p = 0, 1, 2, ...; position p is entry ``order(epoch)[p % n]`` with epoch = p // n, where
``order`` is a seeded permutation (row groups of parquet files are kept together:
the block order is permuted, then the rows inside each block). tf.data maps positions to
examples in parallel (decode → resize/patchify → chat template + tokenize → M-RoPE
positions, `encode.RecordEncoder`), drops bad records (counted per source, each file/index
logged once), batches and prefetches. Mixing (`ReplayConfig.strategy`):

  round_robin  homogeneous single-source batches, sources in turn (the released code)
  uniform      every example from source s with probability 1 / S
  propmix      probability proportional to source size
  coreset      like propmix, but each replay source (all except ``primary``) is cut to a
               fixed seeded subset so that replay totals at most coreset_ratio (1/2) of the
               primary (reasoning) volume
  modomodo     fixed probabilities (``weights``; default the paper's 0.3045 / 0.2024 /
               0.2117 / 0.2814 for lisa / geoqav / sat / scienceqa)

The probabilistic strategies draw one source per example (per batch if homogeneous=True)
from a stateless RNG keyed by (seed, draw index). Everything is a pure function of the
config, so two runs give the same stream, and the state - the next draw index and the next
position of every source - resumes it exactly.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import threading
import weakref
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from recap_jax.data import encode as encode_lib
from recap_jax.data.records import BadRecord, Record, SkipCounter
from recap_jax.data.tasks import get_task

__all__ = ["MODOMODO_SHARES", "STRATEGIES", "ReplayConfig", "ReplayIterator", "SourceStream",
           "epoch_steps", "make_replay", "mixing_probabilities", "stream_sizes"]

STRATEGIES = ("round_robin", "uniform", "propmix", "coreset", "modomodo")
MODOMODO_SHARES = {"lisa": 0.3045, "geoqav": 0.2024, "sat": 0.2117, "scienceqa": 0.2814}
STATE_VERSION = 1
_log = logging.getLogger(__name__)
# Live iterators are closed at exit: a tf.data pipeline whose py_function threads outlive
# the interpreter's teardown can deadlock on the GIL.
_LIVE_ITERATORS: "weakref.WeakSet[ReplayIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


class RecordSource(Protocol):
    name: str

    def __len__(self) -> int: ...
    def load(self, i: int) -> Record: ...
    def where(self, i: int) -> tuple[str, int]: ...
    @property
    def blocks(self) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """How sources are mixed and batched.

    Attributes:
      batch_size: examples per batch (B).
      strategy: one of STRATEGIES (see the module docstring).
      homogeneous: single-source batches; None = True for round_robin, else False.
      weights: per-source probabilities for modomodo, in source order (normalised).
      primary: the reasoning sources for coreset (default: the first source).
      coreset_ratio: replay volume cap as a fraction of the primary volume.
      seed: seeds the per-epoch permutations, the coreset subsets and the source draws.
      prompt_buckets / answer_buckets / patch_buckets: padded lengths of prompts, reference
        answers and per-example patch lists; longer examples are skipped as bad records,
        except prompts under prompt_overflow="truncate".
      prompt_overflow: a prompt longer than max(prompt_buckets) is "skip"ped (a bad record,
        counted) or "truncate"d: question tokens are dropped from its end until it fits
        (template, image tokens and task suffix kept), counted in ``skips.notes(source)``
        as "truncated", logged once per source.
      num_parallel_calls: chunks encoded at once per source; chunk_size: stream positions per
        python call (amortises tf.py_function overhead); prefetch: batches read ahead.
      probe_limit: at start-up each source must yield a usable record within this many.
    """

    batch_size: int = 8
    strategy: str = "round_robin"
    homogeneous: bool | None = None
    weights: tuple[float, ...] | None = None
    primary: tuple[str, ...] = ()
    coreset_ratio: float = 0.5
    seed: int = 0
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    answer_buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    patch_buckets: tuple[int, ...] = (64, 256, 1024, 4096, 16384)
    num_parallel_calls: int = 2
    chunk_size: int = 8
    prefetch: int = 2
    probe_limit: int = 256
    prompt_overflow: str = "skip"

    def __post_init__(self):
        if self.prompt_overflow not in encode_lib.PROMPT_OVERFLOWS:
            raise ValueError(f"ReplayConfig.prompt_overflow {self.prompt_overflow!r} unknown; "
                             f"one of {encode_lib.PROMPT_OVERFLOWS}")
        if self.batch_size < 1:
            raise ValueError(f"ReplayConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ReplayConfig.strategy {self.strategy!r} unknown; "
                             f"one of {STRATEGIES}")
        if not 0 < self.coreset_ratio:
            raise ValueError(f"ReplayConfig.coreset_ratio must be > 0, got {self.coreset_ratio}")
        for name in ("prompt_buckets", "answer_buckets", "patch_buckets"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"ReplayConfig.{name} must be non-empty positive sizes: {values}")
        if min(self.num_parallel_calls, self.chunk_size, self.probe_limit) < 1 or self.prefetch < 0:
            raise ValueError("ReplayConfig: num_parallel_calls, chunk_size and probe_limit must "
                             "be >= 1, prefetch >= 0")

    @property
    def is_homogeneous(self) -> bool:
        return self.strategy == "round_robin" if self.homogeneous is None else self.homogeneous


# --------------------------------------------------------------------------- mixing (pure)


def stream_sizes(config: ReplayConfig, names: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """Entries each source's stream cycles through: its size, or for coreset replay sources
    its share (proportional to size) of min(replay total, coreset_ratio * primary total)."""
    sizes = [int(n) for n in sizes]
    if config.strategy != "coreset":
        return sizes
    primary = set(config.primary or names[:1])
    unknown = primary - set(names)
    if unknown:
        raise ValueError(f"ReplayConfig.primary names unknown sources {sorted(unknown)}; "
                         f"sources: {list(names)}")
    primary_total = sum(n for name, n in zip(names, sizes) if name in primary)
    replay_total = sum(n for name, n in zip(names, sizes) if name not in primary)
    budget = min(replay_total, int(config.coreset_ratio * primary_total))
    capped = []
    for name, n in zip(names, sizes):
        if name in primary:
            capped.append(n)
        else:
            share = int(round(budget * n / replay_total))
            if share < 1:
                raise ValueError(f"coreset: replay source {name!r} gets no example (budget "
                                 f"{budget} of {replay_total}); raise coreset_ratio")
            capped.append(min(n, share))
    return capped


def epoch_steps(sizes: Sequence[int], rows_per_batch: int | Sequence[int], *,
                strategy: str = "round_robin", sources_per_update: int = 1,
                names: Sequence[str] | None = None) -> int:
    """Optimizer steps of one pass that ends when the smallest source is exhausted (the
    released RLVR-only run length, 328 steps, instead of a fixed step count).

    The released uniform sampler cuts each source's shuffled indices into full batches
    (``rows_per_batch`` rows: unique prompts of an RL source, rows of an SFT source; one
    number for all sources or one per source), drops the remainders, and runs
    ``rounds = min_s floor(size_s / rows_s)`` rounds of one batch per source; with
    ``sources_per_update`` batches accumulated per optimizer step (gradient accumulation):
    steps = rounds * S // sources_per_update. E.g. RLVR-only: 4 sources, 16 prompts per batch,
    a smallest source (LISA-train) of 1,312-1,327 rows -> 82 rounds -> 328 steps.

    Only ``round_robin`` has an epoch (the probabilistic strategies draw with replacement).
    ValueError naming the source if one cannot fill a single batch.
    """
    if strategy != "round_robin":
        raise ValueError(f"epoch_steps: strategy {strategy!r} has no epoch end; only "
                         "'round_robin' (homogeneous batches, sources in turn) does")
    sizes = [int(n) for n in sizes]
    if not sizes:
        raise ValueError("epoch_steps: sizes must name at least one source")
    names = list(names) if names is not None else [f"#{k}" for k in range(len(sizes))]
    if len(names) != len(sizes):
        raise ValueError(f"epoch_steps: {len(names)} names for {len(sizes)} sizes")
    rows = ([int(rows_per_batch)] * len(sizes) if isinstance(rows_per_batch, (int, np.integer))
            else [int(r) for r in rows_per_batch])
    if len(rows) != len(sizes):
        raise ValueError(f"epoch_steps: rows_per_batch has {len(rows)} entries for "
                         f"{len(sizes)} sources")
    if min(rows) < 1:
        raise ValueError(f"epoch_steps: rows_per_batch must be >= 1, got {rows}")
    if isinstance(sources_per_update, bool) or int(sources_per_update) < 1:
        raise ValueError(f"epoch_steps: sources_per_update must be an int >= 1, "
                         f"got {sources_per_update!r}")
    rounds = [n // r for n, r in zip(sizes, rows)]
    for name, n, r, k in zip(names, sizes, rows, rounds):
        if k == 0:
            raise ValueError(f"epoch_steps: source {name!r} has {n} records, fewer than one "
                             f"batch of {r}")
    return min(rounds) * len(sizes) // int(sources_per_update)


def mixing_probabilities(config: ReplayConfig, names: Sequence[str],
                         stream_lengths: Sequence[int]) -> np.ndarray | None:
    """Per-source draw probabilities (float64 [S]), or None for round_robin."""
    count = len(names)
    if config.strategy == "round_robin":
        return None
    if config.strategy == "uniform":
        return np.full(count, 1.0 / count)
    if config.strategy in ("propmix", "coreset"):
        sizes = np.asarray(stream_lengths, np.float64)
        return sizes / sizes.sum()
    if config.weights is not None:
        weights = np.asarray(config.weights, np.float64)
        if weights.shape != (count,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"ReplayConfig.weights must be {count} non-negative numbers with a "
                             f"positive sum (one per source {list(names)}), got {config.weights}")
    else:
        missing = [name for name in names if name not in MODOMODO_SHARES]
        if missing:
            raise ValueError(f"modomodo: no default share for {missing}; pass "
                             f"ReplayConfig.weights (defaults exist for {sorted(MODOMODO_SHARES)})")
        weights = np.asarray([MODOMODO_SHARES[name] for name in names])
    return weights / weights.sum()


class SourceStream:
    """Position p → entry index of one source: seeded per-epoch block-wise permutations of
    the source's (coreset-capped) entries."""

    def __init__(self, source: RecordSource, seed: int, length: int | None = None):
        self.source, self.name = source, source.name
        blocks = np.asarray(source.blocks, np.int64)
        self._key = [int(seed), zlib.crc32(source.name.encode())]
        indices = np.arange(len(source))
        if length is not None and length < len(source):
            subset = np.random.default_rng([*self._key, 1]).permutation(len(source))[:length]
            indices = np.sort(subset)
        self.indices, self.blocks = indices, blocks[indices]
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, epoch: int) -> np.ndarray:
        """Entry indices of one epoch (rows of a block stay together)."""
        with self._lock:
            if epoch not in self._orders:
                rng = np.random.default_rng([*self._key, 2, epoch])
                unique = np.unique(self.blocks)
                pieces = []
                for block in rng.permutation(unique):
                    members = self.indices[self.blocks == block]
                    pieces.append(members[rng.permutation(len(members))])
                self._orders[epoch] = np.concatenate(pieces)
                for old in [e for e in self._orders if e < epoch - 1]:
                    del self._orders[old]
            return self._orders[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), len(self.indices))
        return int(self.order(epoch)[offset])


# --------------------------------------------------------------------------- pipeline


_META_FIELDS = {"answer": "string", "id": "string", "stream_position": "int64", "ok": "bool",
                "prompt_length": "int32", "answer_length": "int32", "num_patches": "int32"}


_PLACEHOLDER_SHAPES = {"input_ids": (1,), "position_ids": (3, 1), "answer_ids": (1,)}


def _stack_padded(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stacks arrays of one rank, zero-padding every axis to the largest size, and to at
    least 1 (a chunk of text-only examples has no patches; tf.data's unbatch segfaults on
    zero-sized axes in TF 2.21, and a zero row is padding to every reader)."""
    shape = np.maximum(np.max([a.shape for a in arrays], axis=0), 1) if arrays[0].ndim else ()
    out = np.zeros((len(arrays), *shape), dtype=arrays[0].dtype)
    for row, array in enumerate(arrays):
        out[(row, *(slice(0, n) for n in array.shape))] = array
    return out


class _ExampleLoader:
    """Stream positions → encoded examples of one source (runs inside tf.py_function)."""

    def __init__(self, stream: SourceStream, encoder: encode_lib.RecordEncoder,
                 skips: SkipCounter):
        self.stream, self.encoder, self.skips = stream, encoder, skips
        self.task = get_task(stream.name)
        self._failures, self._lock = 0, threading.Lock()
        self._placeholder = None

    def encode(self, position: int) -> tuple[dict[str, np.ndarray], Record]:
        index = self.stream.index_at(position)
        record = self.stream.source.load(index)

        def note(kind: str, message: str) -> None:  # used but altered (e.g. truncated)
            self.skips.note(self.stream.name, kind, *self.stream.source.where(index), message)

        return self.encoder.encode(self.task, record, note=note), record

    def example(self, position: int) -> tuple[dict[str, np.ndarray], str, str, bool]:
        """(arrays, answer text, record id, ok); a bad record is counted and gives ok=False."""
        try:
            arrays, record = self.encode(position)
        except BadRecord as error:
            index = self.stream.index_at(position)
            self.skips.skip(self.stream.name, *self.stream.source.where(index), error)
            with self._lock:
                self._failures += 1
                failures = self._failures
            if failures > len(self.stream) + 1:
                raise RuntimeError(f"source {self.stream.name!r}: {failures} unusable records in "
                                   f"a row (reasons: {self.skips.reasons(self.stream.name)})"
                                   ) from error
            return self._placeholder, "", "", False
        with self._lock:
            self._failures = 0
        return arrays, record.answer_text, record.id, True

    def chunk(self, positions) -> list[np.ndarray]:
        """Stacked, zero-padded arrays of several positions (one py_function call for all,
        to amortise its overhead), in the order of ARRAY_FIELDS then _META_FIELDS."""
        positions = positions.numpy() if hasattr(positions, "numpy") else np.asarray(positions)
        examples = [self.example(int(p)) for p in positions]
        stacked = [_stack_padded([arrays[key] for arrays, *_ in examples])
                   for key in encode_lib.ARRAY_FIELDS]
        arrays = [e[0] for e in examples]
        meta = [
            np.asarray([e[1] for e in examples], dtype=object),
            np.asarray([e[2] for e in examples], dtype=object),
            positions.astype(np.int64),
            np.asarray([e[3] for e in examples], dtype=bool),
            np.asarray([len(a["input_ids"]) for a in arrays], np.int32),
            np.asarray([len(a["answer_ids"]) for a in arrays], np.int32),
            np.asarray([len(a["pixel_values"]) for a in arrays], np.int32),
        ]
        return stacked + meta

    def probe(self, limit: int) -> None:
        """Fails at start-up, clearly, if none of the first ``limit`` positions is usable."""
        tried = min(limit, len(self.stream))
        for position in range(tried):
            try:
                example = self.encode(position)[0]
            except BadRecord as error:
                index = self.stream.index_at(position)
                self.skips.skip(self.stream.name, *self.stream.source.where(index), error)
                continue
            # Same fixed axes as a real example, variable axes of size 1 (never 0: tf.data's
            # unbatch segfaults on zero-sized axes in TF 2.21). Filtered out by ok=False.
            self._placeholder = {key: np.zeros(_PLACEHOLDER_SHAPES.get(key, value.shape),
                                               value.dtype) for key, value in example.items()}
            self._placeholder["pixel_values"] = np.zeros((1, example["pixel_values"].shape[1]),
                                                         np.float32)
            return
        raise ValueError(f"source {self.stream.name!r}: none of the first {tried} records is "
                         f"usable (bad records: {self.skips.reasons(self.stream.name)})")


def _example_dataset(tf, loader: _ExampleLoader, source_id: int, start: int,
                     config: ReplayConfig):
    """Examples of one source from stream position ``start`` on, bad records dropped."""
    fields = {name: (tf.as_dtype(dtype), rank)
              for name, (dtype, rank) in encode_lib.ARRAY_FIELDS.items()}
    fields.update({name: (tf.as_dtype(kind), 0) for name, kind in _META_FIELDS.items()})

    def load(positions):
        values = tf.py_function(loader.chunk, [positions], [dtype for dtype, _ in fields.values()])
        chunk = {}
        for (name, (_, rank)), value in zip(fields.items(), values):
            value.set_shape([None] * (rank + 1))
            chunk[name] = value
        chunk["image_grid_thw"].set_shape([None, 3])
        chunk["image_grids"].set_shape([None, None, 3])
        chunk["video_grid_thw"].set_shape([None, None, 3])
        chunk["position_ids"].set_shape([None, 3, None])
        chunk["source_id"] = tf.fill(tf.shape(chunk["ok"]), tf.constant(source_id, tf.int32))
        return chunk

    dataset = tf.data.Dataset.range(start, np.iinfo(np.int64).max).batch(config.chunk_size)
    dataset = dataset.map(load, num_parallel_calls=config.num_parallel_calls, deterministic=True)
    dataset = dataset.unbatch().filter(lambda example: example["ok"])
    return dataset.map(lambda example: {k: v for k, v in example.items() if k != "ok"})


def _choice_dataset(tf, probabilities: np.ndarray | None, count: int, seed: int, start: int):
    draws = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    if probabilities is None:
        return draws.map(lambda k: k % count)
    with np.errstate(divide="ignore"):
        logits = tf.constant(np.log(probabilities)[None, :], tf.float64)

    def draw(k):
        stateless_seed = tf.stack([tf.constant(seed, tf.int64), k])
        return tf.random.stateless_categorical(logits, 1, seed=stateless_seed)[0, 0]

    return draws.map(draw)


# --------------------------------------------------------------------------- iterator


class ReplayIterator:
    """Batches of the mixed replay stream (see make_replay). ``state()`` after any batch
    resumes the exact stream from the next batch."""

    def __init__(self, sources: Sequence[RecordSource], processor, model_config,
                 config: ReplayConfig, *, state: dict | None = None,
                 skips: SkipCounter | None = None):
        import tensorflow as tf

        names = [source.name for source in sources]
        if not names:
            raise ValueError("make_replay: no sources")
        if len(set(names)) != len(names):
            raise ValueError(f"make_replay: duplicate source names {names}")
        for name in names:
            get_task(name)
        self.config, self.names = config, names
        self.skips = SkipCounter() if skips is None else skips
        lengths = stream_sizes(config, names, [len(source) for source in sources])
        self.probabilities = mixing_probabilities(config, names, lengths)
        self.streams = [SourceStream(source, config.seed, length)
                        for source, length in zip(sources, lengths)]
        self.encoder = encode_lib.RecordEncoder(
            processor, model_config, max_prompt_tokens=max(config.prompt_buckets),
            max_answer_tokens=max(config.answer_buckets), prompt_overflow=config.prompt_overflow)
        self._fingerprint = self._make_fingerprint(lengths)
        self._choice_position, self._positions = self._initial_positions(state)
        self._batches = 0 if state is None else int(state["batches"])
        loaders = [_ExampleLoader(stream, self.encoder, self.skips) for stream in self.streams]
        for loader in loaders:
            loader.probe(config.probe_limit)
        self._dataset = self._build(tf, loaders)
        self._iterator = self._dataset.as_numpy_iterator()
        _LIVE_ITERATORS.add(self)

    def _make_fingerprint(self, lengths) -> dict:
        config = self.config
        return {"strategy": config.strategy, "seed": config.seed,
                "batch_size": config.batch_size, "homogeneous": config.is_homogeneous,
                "sources": list(self.names), "stream_lengths": [int(n) for n in lengths],
                "probabilities": None if self.probabilities is None else [
                    round(float(p), 12) for p in self.probabilities]}

    def _initial_positions(self, state):
        if state is None:
            return 0, [0] * len(self.names)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"replay state version {state.get('version')} != {STATE_VERSION}")
        saved = state.get("fingerprint")
        if saved != self._fingerprint:
            raise ValueError(f"replay state was saved for a different configuration:\n"
                             f"  saved: {saved}\n  now:   {self._fingerprint}")
        return int(state["choice_position"]), [int(p) for p in state["source_positions"]]

    def _build(self, tf, loaders):
        config = self.config
        examples = [_example_dataset(tf, loader, source_id, start, config)
                    for source_id, (loader, start) in enumerate(zip(loaders, self._positions))]
        choice = _choice_dataset(tf, self.probabilities, len(examples), config.seed,
                                 self._choice_position)
        if config.is_homogeneous:
            batched = [ds.padded_batch(config.batch_size, drop_remainder=True) for ds in examples]
            dataset = tf.data.Dataset.choose_from_datasets(batched, choice)
        else:
            dataset = tf.data.Dataset.choose_from_datasets(examples, choice)
            dataset = dataset.padded_batch(config.batch_size, drop_remainder=True)
        options = tf.data.Options()
        options.deterministic = True
        return dataset.with_options(options).prefetch(config.prefetch)

    def __iter__(self) -> "ReplayIterator":
        return self

    def __enter__(self) -> "ReplayIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops the tf.data pipeline (its prefetch threads); the iterator is then unusable."""
        self._iterator = self._dataset = None
        _LIVE_ITERATORS.discard(self)

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            raise RuntimeError("this ReplayIterator was closed")
        padded = next(self._iterator)
        config = self.config
        batch = encode_lib.collate(padded, pad_id=self.encoder.pad_id,
                                   prompt_buckets=config.prompt_buckets,
                                   answer_buckets=config.answer_buckets,
                                   patch_buckets=config.patch_buckets)
        for key in ("answer", "id"):
            batch[key] = np.asarray([v.decode("utf-8") for v in batch[key]], dtype=object)
        self._advance(batch)
        return batch

    def _advance(self, batch) -> None:
        self._batches += 1
        self._choice_position += 1 if self.config.is_homogeneous else len(batch["source_id"])
        for source_id, position in zip(batch["source_id"], batch["stream_position"]):
            self._positions[source_id] = max(self._positions[source_id], int(position) + 1)

    def state(self) -> dict:
        """JSON-able position of the stream after the last returned batch."""
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint,
                "choice_position": self._choice_position,
                "source_positions": list(self._positions), "batches": self._batches}

    def save_state(self, path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.state(), handle)

    @staticmethod
    def load_state(path) -> dict:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)


def make_replay(sources: Sequence[RecordSource], processor, model_config,
                config: ReplayConfig = ReplayConfig(), *, state: dict | None = None,
                skips: SkipCounter | None = None) -> ReplayIterator:
    """The mixed, batched, prefetched replay stream over ``sources``.

    Args:
      sources: opened sources; each ``name`` must be a registered task (prompt template);
        ``source_id`` in batches is the index in this list.
      processor: a Qwen2_5_VLProcessor (tokenizer, chat template, min/max pixels).
      model_config: the Qwen2_5_VLConfig (special token ids, patch and merge sizes).
      config: mixing and batching (ReplayConfig).
      state: a ``ReplayIterator.state()`` to resume from (same sources and config).
      skips: where bad records are counted (default: a new SkipCounter, ``.skips``).
    Raises ValueError at start-up for a bad config, a stale state, or a source with nothing
    usable.
    """
    return ReplayIterator(sources, processor, model_config, config, state=state, skips=skips)
