"""Hugging Face Qwen2.5-VL checkpoints <-> our parameters.

Reading is streaming: headers are checked first (every missing, unexpected or mis-shaped
tensor is reported in one error before any data is read), then each parameter is built
with ``jax.make_array_from_callback`` straight onto its sharding, reading from the
safetensors files only the tensors that shard needs. Host memory stays at about one tensor
at a time. Pickled weights (``*.bin``, ``*.pt``) are refused: unpickling runs code.

Both spellings of tensor names are read: the hub's (``visual.``, ``model.layers.``) and
transformers 5's (``model.visual.``, ``model.language_model.``). We write the hub's, which
every tool (transformers 4 and 5, vLLM, ...) loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from recap_jax import parallel
from recap_jax.models.qwen2_5_vl import text, vision
from recap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from recap_jax.models.qwen2_5_vl.layers import TensorSpec
from recap_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# tensor-name prefix of each part, per spelling
SPELLINGS = {
    "hub": {"visual": "visual.", "language_model": "model.", "lm_head": "lm_head."},
    "transformers5": {"visual": "model.visual.", "language_model": "model.language_model.", "lm_head": "lm_head."},
}
# non-persistent buffers some exporters still write
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class _Mapping:
    path: tuple[str, ...]  # our full parameter path
    spec: TensorSpec
    prefix: str  # the part's prefix in the checkpoint

    def hf_names(self, num_layers: int) -> list[str]:
        if self.spec.stacked:
            return [self.prefix + self.spec.hf_name.format(i=i) for i in range(num_layers)]
        return [self.prefix + self.spec.hf_name]


def _lm_head_spec() -> TensorSpec:
    return TensorSpec("weight", ("kernel",), to_ours=lambda w: w.T, to_hf=lambda k: k.T)


def tensor_mappings(config: Qwen2_5_VLConfig, spelling: str = "hub") -> list[_Mapping]:
    """Every parameter of the model with its checkpoint tensor(s), for one naming spelling."""
    prefixes = SPELLINGS[spelling]
    parts = [("visual", vision.vision_tensor_specs(config.vision)),
             ("language_model", text.text_tensor_specs(config.text))]
    if not config.text.tie_word_embeddings:
        parts.append(("lm_head", [_lm_head_spec()]))
    return [_Mapping((part, *spec.path), spec, prefixes[part]) for part, specs in parts for spec in specs]


def _num_layers(config: Qwen2_5_VLConfig, mapping: _Mapping) -> int:
    return config.vision.depth if mapping.path[0] == "visual" else config.text.num_hidden_layers


# ----------------------------------------------------------------------------- reading
class SafetensorsDirectory:
    """The safetensors files of a checkpoint directory, opened lazily, one name -> file map."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._handles: dict[str, Any] = {}
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: not a directory")
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        index_path = os.path.join(self.directory, INDEX_FILE)
        self.file_of: dict[str, str] = {}
        if os.path.exists(index_path):
            self._read_index(index_path)
        elif files:
            for name in files:
                for key in self.handle(name).keys():
                    self.file_of[key] = name
        else:
            pickled = sorted(f for f in os.listdir(self.directory) if f.endswith(PICKLE_SUFFIXES))
            if pickled:
                raise CheckpointError(
                    f"{self.directory}: only pickled weights found ({', '.join(pickled)}). They are refused "
                    "because unpickling can run arbitrary code; convert them to safetensors first (e.g. "
                    "transformers' save_pretrained(..., safe_serialization=True)).")
            raise CheckpointError(f"{self.directory}: no *.safetensors files")

    def _read_index(self, index_path: str) -> None:
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(self.directory, f))})
        if missing:
            raise CheckpointError(f"{index_path}: shard files listed in the index are missing: {missing}")
        self.file_of = dict(weight_map)

    def _open(self, filename: str):
        path = os.path.join(self.directory, filename)
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = self._open(filename)
        return self._handles[filename]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle(self.file_of[name]).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        filename = self.file_of[name]
        try:
            return self.handle(filename).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{os.path.join(self.directory, filename)}: cannot read {name} ({e})") from None


def _detect_spelling(names: list[str]) -> str:
    return "transformers5" if any(n.startswith("model.language_model.") for n in names) else "hub"


def _expected_hf_shape(spec: TensorSpec, our_layer_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape a parameter of ``our_layer_shape`` corresponds to.

    Runs the layout conversion on a zero-stride stand-in: transposes and reshapes of it are
    views, so no memory of the tensor's size is touched.
    """
    stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=our_layer_shape,
                                               strides=(0,) * len(our_layer_shape), writeable=False)
    return tuple(np.shape(spec.to_hf(stand_in)))


def _check_tensors(files: SafetensorsDirectory, mappings: list[_Mapping], abstract: dict, config) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    available = set(files.names())
    consumed: set[str] = set()
    missing, misshaped = [], []
    for m in mappings:
        our_shape = tuple(abstract[m.path].shape)
        layer_shape = our_shape[1:] if m.spec.stacked else our_shape
        want = _expected_hf_shape(m.spec, layer_shape)
        for name in m.hf_names(_num_layers(config, m)):
            if name not in available:
                missing.append(name)
                continue
            consumed.add(name)
            got = files.shape(name)
            if got != want:
                misshaped.append(f"{name}: checkpoint {list(got)} vs model {list(want)}")
    unexpected = sorted(n for n in available - consumed if not n.endswith(IGNORED_SUFFIXES)
                        and not (config.text.tie_word_embeddings and n == "lm_head.weight"))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {misshaped}")
    if problems:
        raise CheckpointError(f"{files.directory}: the checkpoint does not match its config.json:\n  "
                              + "\n  ".join(problems))


def _layer_reader(files: SafetensorsDirectory, spec: TensorSpec, dtype) -> Callable[[str], np.ndarray]:
    """Reads one checkpoint tensor in our layout and dtype, remembering only the last one."""
    last: dict[str, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        if name not in last:
            last.clear()
            last[name] = np.ascontiguousarray(spec.to_ours(files.read(name))).astype(dtype)
        return last[name]

    return read


def _shard_callback(files, mapping: _Mapping, num_layers: int, dtype) -> Callable:
    read = _layer_reader(files, mapping.spec, dtype)
    names = mapping.hf_names(num_layers)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not mapping.spec.stacked:
            return read(names[0])[index]
        layers = range(num_layers)[index[0]]
        return np.stack([read(names[i])[index[1:]] for i in layers])

    return callback


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    mesh: jax.sharding.Mesh | None = None, rules=None,
                    remat: str = "none") -> Qwen2_5_VLForConditionalGeneration:
    """Loads a Hugging Face Qwen2.5-VL directory (config.json + single or indexed safetensors).

    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: dtype).
    mesh: when given, each parameter is created directly on its sharding (logical-axis
    rules: `recap_jax.parallel.DEFAULT_RULES` unless ``rules`` is given).
    """
    path = os.fspath(path)
    config = Qwen2_5_VLConfig.from_json_file(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    files = SafetensorsDirectory(path)
    abstract_model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(
        config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = dict(nnx.to_flat_state(abstract_state))
    abstract = {p: v.get_value() for p, v in flat.items()}
    mappings = tensor_mappings(config, _detect_spelling(files.names()))
    unmapped = sorted(set(abstract) - {m.path for m in mappings})
    if unmapped:  # a bug in our own specs, not in the checkpoint
        raise AssertionError(f"parameters without a checkpoint mapping: {unmapped}")
    _check_tensors(files, mappings, abstract, config)
    shardings = _shardings(abstract_state, mesh, rules)

    values = {}
    for m in mappings:
        shape, dt = abstract[m.path].shape, abstract[m.path].dtype
        values[m.path] = jax.make_array_from_callback(
            shape, shardings[m.path], _shard_callback(files, m, _num_layers(config, m), np.dtype(dt)))
    for path_, variable in flat.items():
        variable.set_value(values[path_])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _shardings(abstract_state, mesh, rules) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Each parameter's sharding by path: one device without a mesh; with one, the logical-axis
    rules (a mesh that cannot split some tensor fails here, listing them all, before any read)."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {path: device for path, _ in nnx.to_flat_state(abstract_state)}
    shardings = parallel.param_shardings(abstract_state, mesh, rules)
    return {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}


# ----------------------------------------------------------------------------- writing
def _hf_tensors(model: Qwen2_5_VLForConditionalGeneration, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for m in tensor_mappings(config, "hub"):
        value = flat[m.path].get_value()
        names = m.hf_names(_num_layers(config, m))
        for i, name in enumerate(names):
            ours = np.asarray(jax.device_get(value[i] if m.spec.stacked else value))
            tensor = np.ascontiguousarray(m.spec.to_hf(ours))
            yield name, tensor if dtype is None else tensor.astype(dtype)


def save_pretrained(model: Qwen2_5_VLForConditionalGeneration, path: str | os.PathLike, *,
                    max_shard_bytes: int = 4 * 2 ** 30, dtype: Any = None) -> None:
    """Writes config.json and (sharded, indexed) safetensors that transformers loads.

    dtype: storage dtype of the written tensors (default: the parameters' own). Files are
    written under temporary names and renamed, so an interrupted save never leaves a
    directory that looks complete.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    dtype = None if dtype is None else np.dtype(dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in _hf_tensors(model, dtype):
        if size + tensor.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    total = sum(t.nbytes for s in shards for t in s.values())
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    for shard, filename in zip(shards, names):
        tmp = os.path.join(path, filename + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, filename))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for shard, f in zip(shards, names) for n in shard}}
        _write_json(os.path.join(path, INDEX_FILE), index)
    hf_config = model.config.to_hf_dict()
    stored = dtype or next(iter(shards[0].values())).dtype
    hf_config["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(stored), "float32")
    _write_json(os.path.join(path, "config.json"), hf_config)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
