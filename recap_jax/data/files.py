"""File access for real data sources: jsonl/parquet rows, lazy parquet images, confined paths."""

from __future__ import annotations

import collections
import glob
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recap_jax.data.records import BadRecord, decode_image

__all__ = ["ParquetColumnReader", "expand_paths", "iter_rows", "resolve_under"]


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``paths``: files, directories (their *.jsonl and *.parquet, sorted; a
    .json list file must be named explicitly) or glob patterns. FileNotFoundError for a
    missing path, ValueError if nothing matches (a typo should fail at start-up)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            files.extend(sorted(p for p in Path(entry).iterdir()
                                if p.suffix in (".jsonl", ".parquet") and p.is_file()))
        elif any(ch in entry for ch in "*?["):
            files.extend(Path(p) for p in sorted(glob.glob(entry)))
        elif os.path.isfile(entry):
            files.append(Path(entry))
        else:
            raise FileNotFoundError(f"data file not found: {entry}")
    if not files:
        raise ValueError(f"no data files (*.jsonl, *.json, *.parquet) in {list(paths)}")
    return files


def resolve_under(root: str | os.PathLike, relative: str) -> Path:
    """``relative`` (or an absolute path) resolved inside ``root``; BadRecord if it escapes.

    ``..`` components, absolute paths outside the root and symlinks pointing out of the root
    are all refused: the resolved path must lie under the resolved root.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BadRecord(f"path: empty image path {relative!r}", "path")
    if "\x00" in relative:
        raise BadRecord(f"path: NUL byte in image path {relative!r}", "path")
    resolved_root = Path(root).resolve()
    candidate = Path(relative)
    if not candidate.is_absolute():
        candidate = resolved_root / candidate
    resolved = candidate.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise BadRecord(f"path: image path {relative!r} escapes image root {resolved_root}",
                        "path")
    return resolved


def read_image_under(root: str | os.PathLike, relative: str, where: str) -> np.ndarray:
    """The decoded image at ``relative`` inside ``root`` (`resolve_under`); BadRecord naming
    the path if it cannot be read or decoded."""
    path = resolve_under(root, relative)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadRecord(f"image: cannot read {path} ({error.strerror or error})",
                        "image") from None
    return decode_image(data, what=where)


def iter_rows(file: Path, *, skip_columns: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
    """(row index, row dict) of a jsonl/json/parquet file. A jsonl line that is not a JSON
    object yields (index, BadRecord) so that the caller can count it."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(file)
        columns = [name for name in schema.names if name not in skip_columns]
        table = pq.read_table(file, columns=columns)
        yield from enumerate(table.to_pylist())
    elif file.suffix == ".json":
        with open(file, encoding="utf-8") as handle:
            rows = json.load(handle)
        if not isinstance(rows, list):
            raise ValueError(f"{file}: a .json data file must hold a list of records")
        yield from enumerate(rows)
    else:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for index, line in enumerate(handle):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield index, BadRecord(f"schema: invalid JSON ({error.msg})", "schema")
                    continue
                if not isinstance(row, dict):
                    yield index, BadRecord("schema: line is not a JSON object", "schema")
                    continue
                yield index, row


class ParquetColumnReader:
    """Random access to one (large) column of a parquet file, one row group at a time.

    Keeps the last ``cache_size`` row groups decoded; thread-safe. Readers that visit rows
    group by group (see ``block`` in recap_jax.data.sources) touch each group once.
    """

    def __init__(self, file: Path, column: str, cache_size: int = 2):
        import pyarrow.parquet as pq

        self.file, self.column = file, column
        metadata = pq.read_metadata(file)
        self.group_starts = [0]
        for group in range(metadata.num_row_groups):
            self.group_starts.append(self.group_starts[-1] + metadata.row_group(group).num_rows)
        self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._parquet_file = None

    def group_of(self, row: int) -> int:
        import bisect

        return bisect.bisect_right(self.group_starts, row) - 1

    def get(self, row: int) -> Any:
        group = self.group_of(row)
        with self._lock:
            values = self._cache.get(group)
            if values is None:
                import pyarrow.parquet as pq

                if self._parquet_file is None:
                    self._parquet_file = pq.ParquetFile(self.file)
                values = self._parquet_file.read_row_group(group, columns=[self.column]).column(
                    0).to_pylist()
                self._cache[group] = values
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(group)
        return values[row - self.group_starts[group]]
