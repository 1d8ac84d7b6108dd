"""python -m recap_jax.benchmarks_eval end to end on a tiny random Qwen2.5-VL checkpoint (with
its tokenizer) and the fixture suites, and its small helpers on hand-worked cases."""

import json
import os
import types

import numpy as np
import pytest

from recap_jax import benchmarks_eval
from recap_jax.bench import ocrbench_v2_text, scoring
from recap_jax.tools.tiny_example import build_checkpoint
from tests.bench.make_fixtures import write_fixtures

SUITES = ("mathvista", "ai2d", "refcoco/testA", "ocrbench")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench_e2e"))
    return build_checkpoint(root), write_fixtures(os.path.join(root, "data")), root


def run_cli(setup, out, *extra):
    model, specs, root = setup
    argv = ["--model", model, "--out", out, "--max-new-tokens", "4", "--cache-dir",
            os.path.join(root, "cache"), *extra]
    for label in SUITES:
        argv += ["--suite", specs[label]]
    assert benchmarks_eval.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as handle:
        return json.load(handle)


def test_cli_writes_per_suite_results_and_a_summary(setup, tmp_path, capsys):
    summary = run_cli(setup, str(tmp_path / "out"), "--batch-size", "2", "--prompt", "thinking")
    suites = summary["suites"]
    assert list(suites) == list(SUITES)
    # rows: mathvista 3, ai2d 2, refcoco 4 (1 missing image, 1 bad box), ocrbench 3 (1 corrupt)
    assert [suites[s]["n"] for s in SUITES] == [3, 2, 2, 2]
    assert [suites[s]["skipped"] for s in SUITES] == [0, 0, 2, 1]
    assert summary["prompt"] == "thinking" and summary["temperature"] == 0.0
    for label in SUITES:
        with open(tmp_path / "out" / (label.replace("/", "_") + ".json")) as handle:
            result = json.load(handle)
        assert len(result["items"]) == result["n"] == suites[label]["n"]
        for record in result["items"]:
            assert 1 <= record["length"] <= 4
            assert record["answer"] == scoring.answer_text(record["completion"])
            assert 0.0 <= record["score"] <= 1.0
        assert result["score"] == pytest.approx(np.mean([r["score"] for r in result["items"]]))
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| refcoco/testA | grounding | 2 |" in table
    captured = capsys.readouterr()
    assert "ETA" in captured.err and table.strip() in captured.out


def test_padding_rows_do_not_change_the_completions(setup, tmp_path):
    """Greedy completions are the same in batches of 1 and of 4 (padded by repetition)."""
    run_cli(setup, str(tmp_path / "one"), "--batch-size", "1", "--limit", "3")
    run_cli(setup, str(tmp_path / "four"), "--batch-size", "4", "--limit", "3")
    for label in SUITES:
        name = label.replace("/", "_") + ".json"
        one = json.loads((tmp_path / "one" / name).read_text())["items"]
        four = json.loads((tmp_path / "four" / name).read_text())["items"]
        assert [r["completion"] for r in one] == [r["completion"] for r in four]


def test_a_bad_suite_spec_fails_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark suite"):
        benchmarks_eval.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path),
                              "--suite", "mmlu=/x"])


# --------------------------------------------------------------------------- helpers


def test_format_progress():
    line = benchmarks_eval.format_progress("ai2d", 25, 100, 50.0)
    # 0.5 items/s, 75 items left -> 150 s
    assert line == ("ai2d [#####...............] 25/100 items, 0.50 items/s, elapsed 0m50s, "
                    "ETA 2m30s")
    assert benchmarks_eval.format_progress("x", 0, 10, 0.0).endswith("ETA ?")


def test_patch_bucket_steps():
    assert [benchmarks_eval.patch_bucket(n) for n in (1, 256, 257, 384, 385, 600, 1000)] == [
        256, 256, 384, 384, 576, 896, 1344]


def test_collate_prompts_pads_rows_by_repeating_the_last():
    def example(n, patches):
        return {"input_ids": np.arange(1, n + 1, dtype=np.int32),
                "pixel_values": np.full((patches, 2), n, np.float32),
                "image_grid_thw": np.asarray([1, 2, patches // 2]), "image_size": np.asarray([4, 4]),
                "input_size": np.asarray([28, 28])}

    batch = benchmarks_eval.collate_prompts([example(2, 4), example(3, 8)], 3, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 1, 2], [1, 2, 3], [1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert batch["pixel_values"].shape == (4 + 8 + 8, 2)
    assert batch["image_grid_thw"][:, 2].tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="need 1..3 examples"):
        benchmarks_eval.collate_prompts([], 3, pad_id=0)


def test_cli_reports_circular_and_ocrbench_v2_metrics_and_skip_reasons(setup, tmp_path):
    model, specs, root = setup
    out = str(tmp_path / "out")
    argv = ["--model", model, "--out", out, "--max-new-tokens", "2", "--batch-size", "4",
            "--cache-dir", os.path.join(root, "cache"), "--suite", specs["mmbench"],
            "--suite", specs["ocrbench_v2"], "--suite", specs["mmmu"]]
    assert benchmarks_eval.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["suites"]
    mmbench = summary["mmbench"]
    # 3 questions, 7 rows: 241 and its 3 copies, 242 and its copy, 243
    assert mmbench["n"] == 7 and mmbench["metrics"]["questions"] == 3
    assert mmbench["score"] == mmbench["metrics"]["circular"]
    items = json.loads((tmp_path / "out" / "mmbench.json").read_text())["items"]
    groups = {}
    for record in items:
        groups.setdefault(record["meta"]["group"], []).append(record["score"])
    assert mmbench["metrics"]["circular"] == pytest.approx(
        np.mean([all(s == 1.0 for s in scores) for scores in groups.values()]))
    assert mmbench["metrics"]["vanilla"] == pytest.approx(
        np.mean([r["score"] for r in items if r["meta"]["rotation"] == 0]))
    v2 = summary["ocrbench_v2"]
    # every task type scored; the empty-answer translation row left out, as published
    assert (v2["n"], v2["skipped"], v2["skip_reasons"]) == (32, 1, {"ignored": 1})
    assert set(v2["metrics"]["overall"]) == {"en", "cn"} and v2["metrics"]["missing_types"] == []
    assert v2["metrics"]["meteor"] == ocrbench_v2_text.meteor_form()
    assert v2["score"] == v2["metrics"]["overall"]["en"]
    # MMMU's multi-image questions (Accounting_2: 2 images, Art_2: 3) are scored, not skipped
    assert (summary["mmmu"]["n"], summary["mmmu"]["skipped"]) == (4, 0)
    mmmu = {r["id"]: r for r in json.loads((tmp_path / "out" / "mmmu.json").read_text())["items"]}
    two = mmmu["validation_Accounting_2"]
    assert two["meta"]["num_images"] == 2 and two["reference"] == "A"
    assert two["score"] == scoring.score("mmmu", two["completion"], types.SimpleNamespace(
        answer="A", choices=("yes", "no"), meta=two["meta"]))
    assert mmmu["validation_Art_2"]["meta"]["num_images"] == 3  # images named by its options
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| mmmu | mmmu | 4 |" in table
    assert "(3 questions)" in table and "| 1 (ignored 1) |" in table


def test_summary_table_details_and_skips():
    result = {"rule": "choice", "n": 8, "score": 0.5, "skipped": 3, "mean_length": 12.25,
              "skip_reasons": {"image": 1, "multi_image": 2},
              "metrics": {"circular": 0.5, "vanilla": 0.75, "questions": 4}}
    assert benchmarks_eval.skipped_text(result) == "3 (multi_image 2, image 1)"
    assert benchmarks_eval.details_text(result) == "circular 50.00, vanilla 75.00 (4 questions)"
    v2 = {"metrics": {"overall": {"en": 0.5, "cn": 0.25}, "missing_types": ["a", "b"]}}
    assert benchmarks_eval.details_text(v2) == "en 50.00; cn 25.00; partial: 2 task types unscored"
    full = {"metrics": {"overall": {"en": 0.5}, "missing_types": [], "meteor": "exact+stem"}}
    assert benchmarks_eval.details_text(full) == "en 50.00; METEOR exact+stem"
    empty = {"rule": "anls", "n": 0, "score": float("nan"), "skipped": 0,
             "mean_length": float("nan")}
    assert benchmarks_eval.summary_table({"mmbench": result, "infovqa": empty}).splitlines()[2:] == [
        "| mmbench | choice | 8 | 50.00 | 3 (multi_image 2, image 1) | 12.2 | circular 50.00, "
        "vanilla 75.00 (4 questions) |",
        "| infovqa | anls | 0 | - | 0 | - |  |"]


def test_cli_multi_image_skip_option_skips_and_counts(setup, tmp_path):
    model, specs, root = setup
    out = tmp_path / "out"
    argv = ["--model", model, "--out", str(out), "--max-new-tokens", "2", "--batch-size", "2",
            "--cache-dir", os.path.join(root, "cache"),
            "--suite", specs["mmmu"] + ";multi_image=skip"]
    assert benchmarks_eval.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())["suites"]["mmmu"]
    assert (summary["n"], summary["skipped"], summary["skip_reasons"]) == (2, 2, {"multi_image": 2})
    assert "| mmmu | mmmu | 2 |" in (out / "summary.md").read_text()
    assert "| 2 (multi_image 2) |" in (out / "summary.md").read_text()


def test_encode_item_shows_every_image_in_order(setup):
    """A 2-image MMMU item: two vision blocks before the text, each with its own image's token
    count, and pixel_values = the images' patches preprocessed one by one, concatenated."""
    from recap_jax.bench.suites import open_suite
    from recap_jax.models.qwen2_5_vl import processor as processor_lib

    model, specs, root = setup
    processor = processor_lib.Qwen2_5_VLProcessor.from_pretrained(model)
    suite = open_suite("mmmu", specs["mmmu"].split("=", 1)[1], cache_dir=os.path.join(root, "cache"))
    by_id = {item.id: item for item in (suite.load(k) for k in range(len(suite)))}
    item = by_id["validation_Accounting_2"]
    encoded = benchmarks_eval.encode_item(processor, item, "plain", 100_000)
    separate = [processor_lib.preprocess_image(image, **processor.image_kwargs)
                for image in item.images]
    np.testing.assert_allclose(encoded["pixel_values"], np.concatenate([p for p, _ in separate]))
    assert encoded["image_grids"].tolist() == [list(g) for _, g in separate]
    assert encoded["image_grids"][0].tolist() != encoded["image_grids"][1].tolist()
    merge = processor.image_kwargs["merge_size"]
    text = processor.tokenizer.decode(encoded["input_ids"].tolist())
    blocks = text.split("<|vision_start|>")[1:]
    assert len(blocks) == 2
    assert [block.count("<|image_pad|>") for block in blocks] == [
        processor_lib.vision_token_count(g, merge) for _, g in separate]
    assert "Is <image 2> darker than <image 1>?" in blocks[1].split("<|vision_end|>")[1]
    # a batch of [2-image row, 1-image row]: grids concatenated in row order
    single = benchmarks_eval.encode_item(processor, by_id["validation_Accounting_1"], "plain",
                                         100_000)
    batch = benchmarks_eval.collate_prompts([encoded, single], 3, pad_id=0)
    assert batch["num_images"].tolist() == [2, 1, 1]
    assert batch["image_grid_thw"].tolist() == [*encoded["image_grids"].tolist(),
                                                single["image_grid_thw"].tolist(),
                                                single["image_grid_thw"].tolist()]
    assert len(batch["pixel_values"]) == len(encoded["pixel_values"]) + 2 * len(single["pixel_values"])
