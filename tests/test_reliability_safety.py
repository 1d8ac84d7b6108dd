"""Reliability, safety: weights only from safetensors, nothing unpickled or evaluated,
dataset paths confined to their roots, checkpoints of another config refused with a list.

- Pickled weights (pytorch_model.bin, *.pt, *.pth, *.pkl, *.ckpt, also when named by a
  safetensors index) are refused, and a pickle whose __reduce__ would create a marker file
  leaves no marker: it was never unpickled. The payload is shown to be live at the end.
- A checkpoint written by transformers for one tiny config, loaded under another config's
  config.json, fails listing every mismatched tensor with both shapes; the expected list
  comes from the two configs' own transformers checkpoints (headers compared here).
- The package source (recap_jax/**/*.py, parsed with ast, so comments and strings do not
  count) has no pickle/marshal/shelve/joblib/dill loads, torch.load, pandas.read_pickle,
  eval/exec, np.load(allow_pickle=True) or yaml.load without a safe loader; the scanner is
  first shown to catch each of those in a planted snippet.
- Every dataset adapter skips and counts as "path" an image path escaping image_root
  (``..``, absolute outside, symlinked file or directory pointing out) and loads the ones
  inside (including inward symlinks and absolute paths inside).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import pickle
import shutil
import textwrap

import numpy as np
import pytest
from PIL import Image

from recap_jax.data import sources
from recap_jax.data.records import SkipCounter
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl.checkpoint import CheckpointError

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "recap_jax"
VOCAB = 64


# ============================================================================ pickles


class MarkerPayload:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def hf_checkpoint(config, path: pathlib.Path) -> pathlib.Path:
    """A transformers-written safetensors checkpoint of ``config`` (random weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**config.to_hf_dict()))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return hf_checkpoint(config_lib.tiny(VOCAB), tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.parametrize("names", [
    ["pytorch_model.bin"], ["model.pt"], ["model.pth"], ["weights.pkl"], ["model.ckpt"],
    ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
])
def test_pickled_weights_are_refused_without_being_unpickled(tmp_path, names):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"model.norm.weight": MarkerPayload(marker)})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config_lib.tiny(VOCAB).to_hf_dict()))
    for name in names:
        (checkpoint / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"only pickled weights found .*"
                                              + names[0].replace(".", r"\.")) as error:
        qwen.from_pretrained(checkpoint)
    assert "safetensors" in str(error.value)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loading it is what would have happened
    assert marker.exists()


def test_an_index_naming_a_pickle_is_refused_without_unpickling(tmp_path, tiny_checkpoint):
    marker = tmp_path / "UNPICKLED"
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(MarkerPayload(marker)))
    from safetensors import safe_open

    with safe_open(tiny_checkpoint / "model.safetensors", "np") as handle:
        weight_map = {name: "pytorch_model.bin" for name in handle.keys()}
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="pytorch_model.bin: corrupt or truncated "
                                              "safetensors"):
        qwen.from_pretrained(checkpoint)
    assert not marker.exists()


def test_safetensors_are_used_and_a_pickle_beside_them_is_ignored(tmp_path, tiny_checkpoint):
    marker = tmp_path / "UNPICKLED"
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(MarkerPayload(marker)))
    model = qwen.from_pretrained(checkpoint)
    assert not marker.exists()
    from safetensors.numpy import load_file

    head = load_file(checkpoint / "model.safetensors")["lm_head.weight"]
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), head.T)


# ============================================================================ another config


def wider_and_deeper(config):
    text = dataclasses.replace(config.text, hidden_size=96, num_attention_heads=6,
                               num_hidden_layers=config.text.num_hidden_layers + 1)
    return dataclasses.replace(config, text=text,
                               vision=dataclasses.replace(config.vision, out_hidden_size=96))


def shallower_vision(config):
    return dataclasses.replace(config, vision=dataclasses.replace(
        config.vision, depth=1, fullatt_block_indexes=(0,)))


def header(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "np") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


@pytest.mark.parametrize("change", [wider_and_deeper, shallower_vision])
def test_checkpoint_of_another_config_is_refused_with_every_mismatch_listed(
        tmp_path, tiny_checkpoint, change):
    other = change(config_lib.tiny(VOCAB))
    found = header(tiny_checkpoint)
    expected = header(hf_checkpoint(other, tmp_path / "other"))  # what `other` should hold
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(other.to_hf_dict()))
    with pytest.raises(CheckpointError, match="does not match its config.json") as error:
        qwen.from_pretrained(checkpoint)
    message = str(error.value)
    misshaped = {n for n in found.keys() & expected.keys() if found[n] != expected[n]}
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    assert misshaped or missing or unexpected
    for name in misshaped:
        assert f"'{name}: checkpoint {list(found[name])} vs model {list(expected[name])}'" in (
            message)
    for name in missing | unexpected:
        assert f"'{name}'" in message
    if missing:
        assert f"missing tensors ({len(missing)})" in message
    if unexpected:
        assert f"unexpected tensors ({len(unexpected)})" in message
    if misshaped:
        assert f"mis-shaped tensors ({len(misshaped)})" in message


# ============================================================================ source scan

UNPICKLERS = {f"{module}.{fn}" for module in ("pickle", "_pickle", "cPickle", "dill",
                                              "cloudpickle", "marshal", "joblib")
              for fn in ("load", "loads", "Unpickler")}
ALWAYS_FORBIDDEN = UNPICKLERS | {
    "shelve.open", "torch.load", "pandas.read_pickle", "eval", "exec", "builtins.eval",
    "builtins.exec", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
    "yaml.full_load_all", "numpy.lib.format.read_array"}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from the module's imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _keyword_or_position(call: ast.Call, keyword: str, position: int):
    for item in call.keywords:
        if item.arg == keyword:
            return item.value
    return call.args[position] if len(call.args) > position else None


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: name' of every call that unpickles or evaluates data."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        name = aliases.get(head, head) + (f".{rest}" if rest else "")
        bad = name in ALWAYS_FORBIDDEN
        if name in ("numpy.load", "jax.numpy.load"):  # numpy.load(file, mmap_mode, allow_pickle)
            flag = _keyword_or_position(node, "allow_pickle", 2)
            bad = flag is not None and not (isinstance(flag, ast.Constant) and not flag.value)
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword_or_position(node, "Loader", 1)
            loader_name = _dotted(loader) if loader is not None else None
            bad = loader_name is None or not loader_name.endswith(SAFE_YAML_LOADERS)
        if bad:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


PLANTED = textwrap.dedent("""
    import pickle, marshal, shelve, yaml, torch
    import numpy as np
    import pandas as pd
    from pickle import loads as undo
    from dill import load
    pickle.load(f)
    undo(b"...")
    load(f)
    marshal.loads(b"")
    shelve.open("db")
    torch.load("w.pt")
    pd.read_pickle("x.pkl")
    eval("1 + 1")
    exec("x = 1")
    np.load("a.npy", allow_pickle=True)
    np.load("a.npy", None, True)
    yaml.load(text)
    yaml.load(text, Loader=yaml.Loader)
    yaml.unsafe_load(text)
""")
BENIGN = textwrap.dedent("""
    import json, yaml
    import numpy as np
    # pickle.load(f) and eval(x) in a comment
    text = "torch.load('w.pt'); exec(code)"
    model.eval()
    self.exec_step(batch)
    json.loads(text)
    np.load("a.npy")
    np.load("a.npy", allow_pickle=False)
    yaml.load(text, Loader=yaml.SafeLoader)
    yaml.safe_load(text)
    pickle_free = data.loads
""")


def test_scanner_catches_every_planted_unsafe_call_and_nothing_benign():
    found = unsafe_calls(PLANTED)
    calls = [line for line in PLANTED.splitlines() if "(" in line and "import" not in line]
    assert len(found) == len(calls) == 14, found
    assert unsafe_calls(BENIGN) == []


def test_package_source_never_unpickles_or_evaluates_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, not an empty glob
    found = [hit for path in files
             for hit in unsafe_calls(path.read_text(encoding="utf-8"),
                                     str(path.relative_to(PACKAGE.parent)))]
    assert found == []


# ============================================================================ dataset paths


def write_png(path: pathlib.Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture
def image_tree(tmp_path):
    """root/ with images inside; outside/ with valid images the rows try to reach."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_png(root / "sub" / "in.png", 0)
    write_png(outside / "secret.png", 1)
    os.symlink(outside / "secret.png", root / "sub" / "link_out.png")
    os.symlink(outside, root / "dir_out")
    os.symlink(root / "sub" / "in.png", root / "link_in.png")
    return root, outside


ESCAPING = ["../outside/secret.png", "sub/../../outside/secret.png", "{outside}/secret.png",
            "sub/link_out.png", "dir_out/secret.png", "./sub/../../outside/secret.png"]
INSIDE = ["sub/in.png", "sub/../sub/in.png", "link_in.png", "{root}/sub/in.png"]


def universal_row(image: str) -> dict:
    """A row every adapter parses: question/answer, a box, and a conversation pair."""
    return {"image": image, "question": "What is shown?", "answer": "A",
            "solution": [1, 1, 5, 5],
            "conversations": [{"from": "human", "value": "<image>What is shown?"},
                              {"from": "gpt", "value": "[1, 1, 5, 5]"}]}


@pytest.mark.parametrize("adapter", sorted(sources.ADAPTERS))
def test_every_adapter_refuses_paths_escaping_image_root(tmp_path, image_tree, adapter):
    root, outside = image_tree
    paths = [p.format(root=root, outside=outside) for p in INSIDE + ESCAPING]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(universal_row(p)) + "\n" for p in paths))
    skips = SkipCounter()
    source = sources.ADAPTERS[adapter](data, image_root=root, skips=skips)
    loaded = list(source)
    assert [record.id for record in loaded] == [f"{data}:{i}" for i in range(len(INSIDE))]
    inside = np.asarray(Image.open(root / "sub" / "in.png").convert("RGB"))
    for record in loaded:
        np.testing.assert_array_equal(record.image, inside)
    assert skips.count(adapter) == len(ESCAPING)
    assert skips.reasons(adapter) == {"path": len(ESCAPING)}
