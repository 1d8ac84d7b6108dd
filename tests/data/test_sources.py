"""Real-data adapters on tiny fixtures written here in each source's schema: good rows come
back as Records equal to what was written; bad rows are skipped, counted and logged once;
image paths cannot escape their root."""

import io
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recap_jax.data import files, sources
from recap_jax.data.records import BadRecord, SkipCounter


def image_array(seed, height=20, width=30):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


def human_gpt(question, answer):
    return [{"from": "human", "value": "<image>" + question}, {"from": "gpt", "value": answer}]


def collect(source):
    return {record.id.rsplit(":", 1)[1]: record for record in source}


# --------------------------------------------------------------------------- ThinkLite


def test_thinklite_parquet_reads_good_rows_and_counts_bad_ones(tmp_path):
    good = {0: image_array(0), 1: image_array(1), 4: image_array(4)}
    rows = [
        dict(problem="<image>What is 2+2?", answer="4", image={"bytes": png_bytes(good[0]), "path": None}),
        dict(problem="Angle ABC?", answer="<answer>30</answer>", image={"bytes": png_bytes(good[1]), "path": "x.png"}),
        dict(problem="   ", answer="1", image={"bytes": png_bytes(good[0]), "path": None}),  # empty text
        dict(problem="Corrupt?", answer="2", image={"bytes": b"\x89PNG broken", "path": None}),
        dict(problem="Area?", answer="12", image={"bytes": png_bytes(good[4]), "path": None}),
        dict(problem="No image?", answer="3", image=None),
    ]
    path = tmp_path / "thinklite.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    skips = SkipCounter()
    source = sources.thinklite(path, skips=skips)
    assert len(source) == 5  # text is checked at open time, lazily read images at load time
    assert set(source.blocks.tolist()) == {0, 1, 2}  # row groups of 2 rows
    records = collect(source)
    assert sorted(records) == ["0", "1", "4"]
    for index, array in good.items():
        np.testing.assert_array_equal(records[str(index)].image, array)
    assert records["0"].question == "What is 2+2?" and records["0"].answer == "4"
    assert records["1"].answer == "30"
    assert all(r.source == "thinklite" for r in records.values())
    assert skips.count("thinklite") == 3
    assert skips.reasons("thinklite") == {"text": 1, "image": 2}


# --------------------------------------------------------------------------- RefCOCO


@pytest.fixture
def refcoco_files(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    arrays = {name: image_array(i, 40, 50) for i, name in enumerate(["a.jpg.png", "b.png"])}
    for name, array in arrays.items():
        Image.fromarray(array).save(root / "train2014" / name, format="PNG")
    outside = tmp_path / "secret.png"
    Image.fromarray(image_array(9)).save(outside)
    os.symlink(outside, root / "train2014" / "link.png")
    question = "Please provide the bounding box coordinate of the region this sentence describes: {}."
    rows = [
        {"image": "train2014/a.jpg.png", "conversations": human_gpt(question.format("man in red"), "[1, 2, 30, 40]"),
         "solution": [1, 2, 30, 40], "normal_caption": "man in red"},                          # 0 good
        {"image": ["train2014/b.png"], "normal_caption": "left dog.", "solution": "<answer>[0,0,10,10]</answer>"},  # 1 good
        {"image": "../secret.png", "conversations": human_gpt("q", "[0,0,5,5]")},               # 2 escape
        {"image": str(outside), "conversations": human_gpt("q", "[0,0,5,5]")},                 # 3 absolute outside
        {"image": "train2014/link.png", "conversations": human_gpt("q", "[0,0,5,5]")},         # 4 symlink out
        {"image": "train2014/a.jpg.png", "conversations": human_gpt("q", "[5, 5, 2, 9]")},     # 5 x2 < x1
        "{not json",                                                                           # 6
        {"image": "train2014/missing.png", "conversations": human_gpt("q", "[0,0,5,5]")},      # 7 missing
        {"image": "train2014/b.png", "conversations": human_gpt("q", "[0, 0, 500, 10]")},      # 8 outside image
        {"image": str(root / "train2014" / "b.png"), "conversations": human_gpt("abs", "[0,0,4,4]")},  # 9 abs inside
        {"image": "train2014/b.png", "conversations": human_gpt("q", "")},                     # 10 no box
    ]
    return write_jsonl(tmp_path / "refcoco_train.jsonl", rows), root, arrays


def test_refcoco_jsonl_records_and_path_confinement(refcoco_files, caplog):
    path, root, arrays = refcoco_files
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING):
        source = sources.refcoco(path, image_root=root, skips=skips)
        first_pass = collect(source)
        second_pass = collect(source)
    assert sorted(first_pass) == ["0", "1", "9"] and sorted(second_pass) == ["0", "1", "9"]
    zero, one = first_pass["0"], first_pass["1"]
    assert zero.answer == (1, 2, 30, 40) and zero.answer_text == "[1, 2, 30, 40]"
    assert zero.question.endswith("describes: man in red.") and "<image>" not in zero.question
    assert one.question.endswith("describes: left dog.") and one.answer == (0, 0, 10, 10)
    np.testing.assert_array_equal(zero.image, arrays["a.jpg.png"])
    np.testing.assert_array_equal(one.image, arrays["b.png"])
    # 2, 3, 4 path escapes; 5 bad box; 6 bad json; 7 missing file; 8 box outside; 10 no box.
    assert skips.count("refcoco") == 8
    assert skips.reasons("refcoco") == {"path": 3, "box": 3, "schema": 1, "image": 1}
    bad_lines = [r for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(bad_lines) == 8  # once each, although the source was read twice
    assert all(str(path) in r.getMessage() for r in bad_lines)


def test_path_based_images_need_an_image_root(refcoco_files):
    path, _, _ = refcoco_files
    with pytest.raises(ValueError, match="pass image_root"):
        sources.refcoco(path)


@pytest.mark.parametrize("relative", ["../x.png", "a/../../x.png", "/etc/passwd", "", "a\x00b"])
def test_resolve_under_refuses_escapes(tmp_path, relative):
    with pytest.raises(BadRecord):
        files.resolve_under(tmp_path, relative)


def test_resolve_under_accepts_paths_inside(tmp_path):
    assert files.resolve_under(tmp_path, "a/./b/../c.png") == (tmp_path / "a" / "c.png").resolve()
    inside = str(tmp_path / "d.png")
    assert files.resolve_under(tmp_path, inside) == (tmp_path / "d.png").resolve()


# --------------------------------------------------------------------------- LLaVA-OV OCR


def test_ocr_llava_parquet_uses_the_first_turn_pair(tmp_path):
    arrays = [image_array(20), image_array(21)]
    conversation = lambda *turns: [{"from": f, "value": v} for f, v in turns]  # noqa: E731
    rows = [
        dict(id="a", image={"bytes": png_bytes(arrays[0]), "path": None}, data_source="textocr",
             conversations=conversation(("human", "<image>\nRead the text."), ("gpt", "HELLO 42"),
                                        ("human", "Again?"), ("gpt", "no"))),
        dict(id="b", image={"bytes": png_bytes(arrays[1]), "path": None}, data_source="textocr",
             conversations=conversation(("human", "<image>What is written?"), ("gpt", " "))),
        dict(id="c", image={"bytes": png_bytes(arrays[1]), "path": None}, data_source="textocr",
             conversations=conversation(("gpt", "orphan answer"))),
    ]
    path = tmp_path / "ocr-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    skips = SkipCounter()
    records = list(sources.ocr_llava(tmp_path, skips=skips))  # a directory works too
    assert len(records) == 1
    assert (records[0].question, records[0].answer) == ("Read the text.", "HELLO 42")
    np.testing.assert_array_equal(records[0].image, arrays[0])
    assert skips.reasons("ocr_llava") == {"text": 2}


# --------------------------------------------------------------------------- RLVR-only sources


def test_lisa_boxes_and_text_sources(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    arrays = [image_array(30 + i, 32, 32) for i in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(root / f"{i}.png")
    lisa_path = write_jsonl(tmp_path / "lisa.jsonl", [
        {"image": "0.png", "problem": "the thing one sits on", "solution": [2, 3, 20, 30]},
        {"image": "1.png", "question": "the cup", "bbox": "[1.5, 2, 8, 9.5]"},
        {"image": "2.png", "question": "broken", "solution": [1, 2, 3]},
    ])
    skips = SkipCounter()
    lisa = list(sources.lisa(lisa_path, image_root=root, skips=skips))
    assert [r.answer for r in lisa] == [(2, 3, 20, 30), (1.5, 2, 8, 9.5)]
    assert skips.reasons("lisa") == {"box": 1}

    sqa_path = write_jsonl(tmp_path / "scienceqa.jsonl", [
        {"image": "0.png", "question": "Which is a mammal?", "choices": ["cat", "trout"], "answer": 0},
        {"image": "1.png", "question": "Pick", "choices": ["x", "y"], "answer": 5},
        {"image": "2.png", "question": "Which?", "options": ["p", "q", "r"], "answer": "C"},
    ])
    sqa = list(sources.scienceqa(sqa_path, image_root=root, skips=skips))
    assert [(r.question, r.answer) for r in sqa] == [
        ("Which is a mammal?\nA. cat\nB. trout", "A"), ("Which?\nA. p\nB. q\nC. r", "C")]
    assert skips.reasons("scienceqa") == {"text": 1}

    geo_path = tmp_path / "geoqav.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"image_path": "2.png", "problem": "Find x.", "answer": "35"},
        {"image_path": "../2.png", "problem": "Escape", "answer": "1"},
    ]), geo_path)
    geo = list(sources.geoqav(geo_path, image_root=root, skips=skips))
    assert [(r.question, r.answer) for r in geo] == [("Find x.", "35")]
    np.testing.assert_array_equal(geo[0].image, arrays[2])
    assert skips.reasons("geoqav") == {"path": 1}

    sat_path = write_jsonl(tmp_path / "sat.jsonl", [
        {"image": "1.png", "conversations": human_gpt("Is the box left of the chair?", "yes")}])
    sat = list(sources.open_source("sat", sat_path, image_root=root, skips=skips))
    assert [(r.source, r.question, r.answer) for r in sat] == [
        ("sat", "Is the box left of the chair?", "yes")]
    assert skips.counts() == {"lisa": 1, "scienceqa": 1, "geoqav": 1}


def test_a_source_with_nothing_usable_fails_at_open(tmp_path):
    path = write_jsonl(tmp_path / "sat.jsonl", ["{broken", {"image": "x.png", "question": ""}])
    with pytest.raises(ValueError, match=r"source 'sat': no usable records .*2 bad"):
        sources.sat(path, image_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.sat(tmp_path / "nope.jsonl", image_root=tmp_path)
    with pytest.raises(ValueError, match="no adapter"):
        sources.open_source("sat", path, adapter="coco")


def test_max_records_limits_the_source(refcoco_files):
    path, root, _ = refcoco_files
    source = sources.refcoco(path, image_root=root, max_records=2)
    assert len(source) == 2


def test_json_list_files_with_odd_records_are_counted(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(image_array(40)).save(root / "a.png")
    path = tmp_path / "geo.json"
    path.write_text(json.dumps([
        7,                                                            # not an object
        {"image": "a.png", "question": ["not", "text"], "answer": "1"},  # wrong type
        {"image": {"path": "a.png"}, "question": "Find y.", "answer": 2.5},
        {"image": "a.png", "question": "Bool?", "answer": True},       # a bool is not text
    ]))
    skips = SkipCounter()
    records = list(sources.geoqav(path, image_root=root, skips=skips))
    assert [(r.question, r.answer) for r in records] == [("Find y.", "2.5")]
    assert skips.reasons("geoqav") == {"schema": 1, "text": 2}
