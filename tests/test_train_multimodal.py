"""The training loop on multi-image, video and text-only records: configs/demo.py shrunk, with
a jsonl source (task scienceqa) whose rows hold two images, a video of four frames, no image,
or one image, next to a synthetic source. SFT warm-start, RL steps on the jsonl source, and
evaluation of its held-out rows (image reliance included) all run, with finite losses."""

import json
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow")

from recap_jax import train  # noqa: E402
from recap_jax.metrics_log import read_jsonl  # noqa: E402
from recap_jax.run_config import source_config  # noqa: E402
from tests.short_run import short_config  # noqa: E402

ROWS = [{"images": ["i0.png", "i1.png"], "question": "Which picture is brighter?", "answer": "A"},
        {"video": ["i2.png", "i3.png", "i4.png", "i5.png"], "fps": 2, "question": "What moves?", "answer": "B"},
        {"images": [], "question": "What is 2 + 3?", "answer": "5"},
        {"image": "i0.png", "question": "What colour is it?", "answer": "C"}]


@pytest.mark.slow
def test_sft_rl_and_eval_run_on_multi_image_and_video_records(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for k in range(6):
        array = np.random.default_rng(k).integers(0, 256, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"i{k}.png")
    path = tmp_path / "mm.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 3))
    held_out = tmp_path / "mm_eval.jsonl"  # pairs of equal grids: image-reliance partners
    # Other images and other texts (with equal texts the swapped pair's NLL sums are equal).
    other_pair = dict(ROWS[0], images=["i2.png", "i3.png"], question="Which one is darker?", answer="B")
    other_video = dict(ROWS[1], video=["i5.png", "i4.png", "i3.png", "i2.png"], question="Where does it go?",
                       answer="left")
    held_out.write_text("".join(json.dumps(row) + "\n" for row in (ROWS[0], other_pair, ROWS[1], other_video)))
    config = short_config(sft__steps=2, rl__steps=2, eval__num_examples=4, eval__batch_size=4)
    config.data.sources = ml_collections.ConfigDict({
        "reasoning": source_config("synthetic", size=20, eval_size=0),
        "scienceqa": source_config("scienceqa", train=str(path), eval=str(held_out), image_root=str(root)),
    })
    config.data.patch_buckets = (64, 128)
    train.train(config, str(tmp_path / "work"))
    records, bad = read_jsonl(str(tmp_path / "work" / "metrics.jsonl"))
    assert not bad
    sft = [r for r in records if r["stage"] == "sft"]
    rl = [r for r in records if r["stage"] == "rl"]
    evals = [r for r in records if r["stage"] == "eval"]
    assert len(sft) == 2 and all(math.isfinite(r["ntp_loss/scienceqa/ntp"]) for r in sft)
    assert [r["source"] for r in rl] == ["reasoning", "scienceqa"]
    assert all(math.isfinite(r["entropy"]) for r in rl)
    assert len(evals) == 2
    for record in evals:  # the two-image rows swap images with each other, the video rows too
        assert "eval/scienceqa/accuracy" in record
        assert record["eval/scienceqa/image_reliance_rows"] == 4
        assert math.isfinite(record["eval/scienceqa/image_reliance"])
        assert record["eval/scienceqa/image_reliance"] != 0.0  # other images, other NLL
