"""scripts/build_grounding_replay.py on a tiny VLM-R1 rec_jsons_processed + COCO fixture: the
rows it keeps, the bad rows it skips and counts by reason, and that recap_jax.data.sources'
refcoco adapter reads its output."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from recap_jax.data import sources

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_grounding_replay.py"
QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {}."


def load_script():
    spec = importlib.util.spec_from_file_location("build_grounding_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def rec(tmp_path):
    coco = tmp_path / "coco" / "train2014"
    coco.mkdir(parents=True)
    Image.new("RGB", (80, 60), "red").save(coco / "COCO_train2014_000000000009.jpg")
    Image.new("RGB", (80, 60), "blue").save(coco / "COCO_train2014_000000000025.jpg")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    folder = tmp_path / "rec_jsons_processed"
    folder.mkdir()
    refcoco = [
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": QUESTION.format("cup"),
         "solution": [10, 5, 40, 30], "normal_caption": "cup"},
        {"image": "train2014/COCO_train2014_000000000001.jpg", "problem": QUESTION.format("gone"),
         "solution": [0, 0, 5, 5]},                                              # missing image
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": "q",
         "solution": [1, 2, 3]},                                                 # malformed box
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": "q",
         "solution": [10, 10, 200, 50]},                                         # outside 80x60
    ]
    (folder / "refcoco_train.json").write_text(json.dumps(refcoco))
    refcocog = [
        json.dumps({"image": "COCO_train2014_000000000025.jpg", "solution": [0, 0, 20, 60],
                    "normal_caption": "the dog."}),                              # bare file name
        "{not json",
        json.dumps({"image": "../../secret.jpg", "problem": "q", "solution": [0, 0, 1, 1]}),
        json.dumps({"image": "COCO_train2014_000000000025.jpg", "solution": [0, 0, 1, 1]}),
    ]
    (folder / "refcocog_train.jsonl").write_text("\n".join(refcocog) + "\n")
    (folder / "refcoco_val.json").write_text("[]")  # not a train file: not read
    return tmp_path


def test_build_keeps_good_rows_and_counts_bad_ones(rec, capsys):
    script = load_script()
    out = rec / "out" / "grounding.jsonl"
    assert script.main(["--rec", str(rec / "rec_jsons_processed"), "--image-root",
                        str(rec / "coco"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": QUESTION.format("cup"),
         "solution": [10, 5, 40, 30], "normal_caption": "cup", "source": "refcoco_train"},
        {"image": "train2014/COCO_train2014_000000000025.jpg", "problem": QUESTION.format("the dog"),
         "solution": [0, 0, 20, 60], "normal_caption": "the dog.", "source": "refcocog_train"},
    ]
    printed = capsys.readouterr().out
    assert "refcoco_train.json: kept 1, skipped 3 {'image': 1, 'box': 2}" in printed
    assert "refcocog_train.jsonl: kept 1, skipped 3 {'schema': 1, 'path': 1, 'question': 1}" in printed
    assert "total: kept 2, skipped 6" in printed
    assert "skipped " + str(rec / "rec_jsons_processed" / "refcoco_train.json") + ":1" in printed
    # the training adapter reads the output
    source = sources.refcoco(str(out), image_root=str(rec / "coco"))
    records = list(source)
    assert [r.answer for r in records] == [(10, 5, 40, 30), (0, 0, 20, 60)]
    assert records[1].image.shape == (60, 80, 3)


def test_cap_per_file_and_missing_inputs(rec, tmp_path):
    script = load_script()
    out = tmp_path / "capped.jsonl"
    counts = script.build([rec / "rec_jsons_processed" / "refcocog_train.jsonl"], rec / "coco", out,
                          max_per_file=1, log=lambda *_: None)
    assert list(counts.values()) == [{"kept": 1, "skipped": {}}]
    assert len(out.read_text().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        script.input_files([str(tmp_path / "absent.json")])
    with pytest.raises(FileNotFoundError, match="image root not found"):
        script.main(["--rec", str(rec / "rec_jsons_processed"), "--image-root",
                     str(tmp_path / "nope"), "--out", str(out)])
