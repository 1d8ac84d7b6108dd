"""Reading a benchmark split from a local copy in its published layout: a Hugging Face dataset
repository's parquet / arrow files (optionally under a config folder), a
``datasets.save_to_disk`` directory, the ``datasets`` cache layout, or a json / jsonl file."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from recap_jax.data.records import BadRecord

__all__ = ["cache_arrow_files", "read_hf_split", "read_json_rows", "split_files"]

_log = logging.getLogger(__name__)


def _split_pattern(split: str, extension: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(split)}(?:-[^/]*)?\.{extension}$")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def split_files(root: Path, split: str, config: str | None, extension: str = "parquet",
                multi_dir: bool = False) -> list[Path]:
    """The split's files in a dataset-repository snapshot: ``<split>.<ext>`` or
    ``<split>-*.<ext>`` under ``root/config`` (when that subdirectory exists) or ``root``.
    ValueError if they span several directories and the suite does not allow it."""
    base = root / config if config and (root / config).is_dir() else root
    pattern = _split_pattern(split, extension)
    files = sorted(f for f in base.rglob(f"*.{extension}")
                   if pattern.match(f.name) and _visible(f, base))
    directories = sorted({str(f.parent.relative_to(base)) for f in files})
    if len(directories) > 1 and not multi_dir:
        raise ValueError(f"{root}: the {split!r} split has files in several directories "
                         f"{directories}; name one with config=<subdirectory>")
    return files


def cache_arrow_files(root: Path, split: str) -> list[Path]:
    """The split's arrow files in a ``datasets`` cache directory
    (``<builder>-<split>[-NNNNN-of-NNNNN].arrow``); of several builds, the newest."""
    pattern = re.compile(rf"^.+-{re.escape(split)}(?:-\d{{5}}-of-\d{{5}})?\.arrow$")
    builds: dict[Path, list[Path]] = {}
    for file in root.rglob("*.arrow"):
        if pattern.match(file.name) and (file.parent / "dataset_info.json").exists():
            builds.setdefault(file.parent, []).append(file)
    if not builds:
        return []
    newest = max(builds, key=lambda d: (d / "dataset_info.json").stat().st_mtime)
    if len(builds) > 1:
        _log.info("%s: %d cached builds of split %r; reading the newest, %s", root, len(builds),
                  split, newest)
    return sorted(builds[newest])


def read_hf_split(path: str | os.PathLike, split: str, config: str | None = None, *,
                  cache_dir: str | None = None, multi_dir: bool = False):
    """A ``datasets.Dataset`` of one split from a local copy (see the module docstring)."""
    import datasets

    datasets.disable_progress_bars()
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"benchmark data not found: {root}")
    if root.is_file():
        if root.suffix not in (".parquet", ".arrow"):
            raise ValueError(f"{root}: expected a .parquet or .arrow file, or a directory")
        return datasets.load_dataset(root.suffix[1:], data_files=[str(root)], split="train",
                                     cache_dir=cache_dir)
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{root}: no split {split!r} in the saved DatasetDict "
                                 f"(splits: {sorted(loaded)})")
            loaded = loaded[split]
        return loaded
    for extension in ("parquet", "arrow"):
        files = split_files(root, split, config, extension, multi_dir)
        if files:
            return datasets.load_dataset(extension, data_files=[str(f) for f in files],
                                         split="train", cache_dir=cache_dir)
    arrows = cache_arrow_files(root, split)
    if arrows:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in arrows])
    raise FileNotFoundError(
        f"{root}: no {split!r} split found (looked for {split}.parquet / {split}-*.parquet"
        f"{' under ' + repr(config) if config else ''}, a save_to_disk directory, and cached "
        f"*-{split}.arrow files)")


def read_json_rows(path: str | os.PathLike) -> list[Any]:
    """Rows of a json file (a list of objects) or a jsonl file; a line that is not valid JSON
    becomes a BadRecord in its place."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data not found: {path}")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    rows: list[Any] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append(BadRecord(f"schema: line {number + 1} is not valid JSON ({error.msg})"))
    return rows
