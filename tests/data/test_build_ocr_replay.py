"""scripts/build_ocr_replay.py on tiny LLaVA-OneVision-style parquet written here: at most N
rows per config, long side downscaled, bad rows skipped and counted, and the output read back
by the ocr_llava adapter."""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recap_jax.data import sources

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_ocr_replay.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_ocr_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(width, height, seed=0):
    array = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def turns(question, answer):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def write_input(root: Path):
    rows_a = [  # config "IIIT5K": 2 bad rows among 5
        {"id": "a0", "image": {"bytes": png(300, 150, 1), "path": None}, "conversations": turns("Read.", "HELLO")},
        {"id": "a1", "image": {"bytes": b"not an image", "path": None}, "conversations": turns("Read.", "x")},
        {"id": "a2", "image": {"bytes": png(40, 90, 2), "path": None}, "conversations": turns("Read.", "world 7")},
        {"id": "a3", "image": {"bytes": png(64, 64, 3), "path": None}, "conversations": []},
        {"id": "a4", "image": {"bytes": png(500, 100, 4), "path": None}, "conversations": turns("Read.", "four")},
    ]
    rows_b = [{"id": f"b{k}", "image": {"bytes": png(60 + k, 30, 10 + k), "path": None},
               "conversations": turns("What is written?", f"text {k}")} for k in range(3)]
    for name, rows in (("IIIT5K", rows_a), ("TextOCR(GPT4V)", rows_b)):
        (root / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / name / "train-00000-of-00001.parquet")


def test_builds_capped_downscaled_replay_read_by_the_adapter(build, tmp_path, capsys):
    write_input(tmp_path / "in")
    code = build.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--max-rows-per-config", "2", "--max-side", "128"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "IIIT5K: kept 2 (downscaled 1), skipped: image 1" in printed  # stops after 2 kept
    assert "TextOCR(GPT4V): kept 2 (downscaled 0), skipped: none" in printed
    assert "total: kept 4 from 2 configs, skipped 1" in printed
    files = sorted(str(p) for p in (tmp_path / "out").glob("*.parquet"))
    assert [Path(f).name for f in files] == ["IIIT5K.parquet", "TextOCR_GPT4V_.parquet"]
    source = sources.open_source("ocr_llava", files)
    records = [source.load(i) for i in range(len(source))]
    assert [r.answer for r in records] == ["HELLO", "world 7", "text 0", "text 1"]
    assert records[0].question == "Read." and records[2].question == "What is written?"
    assert records[0].image.shape == (64, 128, 3)  # 300 x 150 -> long side 128, ratio kept
    assert records[1].image.shape == (90, 40, 3)  # already small: untouched
    assert max(max(r.image.shape[:2]) for r in records) <= 128


def test_counts_every_bad_row_and_fails_when_nothing_is_kept(build, tmp_path, capsys):
    write_input(tmp_path / "in")
    assert build.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--configs", "IIIT5K", "--max-side", "512"]) == 0
    out = capsys.readouterr().out
    assert "IIIT5K: kept 3 (downscaled 0), skipped: conversations 1, image 1" in out
    empty = tmp_path / "empty" / "X"
    empty.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": b"", "path": None}, "conversations": []}]),
                   empty / "a.parquet")
    assert build.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o2")]) == 1


@pytest.mark.parametrize("args, message", [
    (["--max-rows-per-config", "0"], "max-rows-per-config"),
    (["--max-side", "0"], "max-side"),
    (["--configs", "Nope"], "config 'Nope': no parquet files"),
])
def test_bad_arguments_name_the_problem(build, tmp_path, capsys, args, message):
    write_input(tmp_path / "in")
    with pytest.raises(SystemExit):
        build.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err
