"""The benchmark adapters on tiny copies of each suite in its published schema and layout
(tests/bench/make_fixtures.py): the question/choices text, the reference, the layout
detection, and bad rows skipped and counted by file and row."""

import json
import os

import numpy as np
import pytest

from recap_jax.bench import ocrbench_v2, ocrbench_v2_text, suites
from recap_jax.benchmarks_eval import open_suites
from tests.bench.make_fixtures import write_fixtures


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_fixtures")
    return str(root), write_fixtures(str(root))


@pytest.fixture(scope="module")
def opened(fixtures):
    root, specs = fixtures
    return {s.label: s for s in open_suites(list(specs.values()), cache_dir=f"{root}/cache")}


def items(suite):
    return [item for item in (suite.load_or_skip(i) for i in range(len(suite))) if item]


def test_every_required_suite_has_an_adapter():
    required = {"mathvista", "mathverse", "mathvision", "mmmu", "mmmu_pro", "ai2d", "mmbench",
                "chartqa", "infovqa", "vizwiz", "ocrbench", "scienceqa", "lisa", "refcoco"}
    assert required <= set(suites.SUITES)


def test_mathvista_uses_the_official_query_and_keeps_types(opened):
    first, second, third = items(opened["mathvista"])
    assert first.question.endswith("Question: Find the angle.\nChoices:\n(A) 145°\n(B) 35°"
                                   "\n(C) 55°\n(D) 125°")
    assert (first.answer, first.choices) == ("145°", ("145°", "35°", "55°", "125°"))
    assert first.meta == {"question_type": "multi_choice", "answer_type": "text", "precision": None}
    assert (second.answer, second.meta["answer_type"]) == ("3", "integer")
    assert (third.answer, third.meta["precision"]) == ("1.45", 2.0)
    assert first.image.shape == (48, 64, 3) and first.image.dtype == np.uint8
    assert tuple(first.image[0, 0]) == (255, 0, 0)  # red, decoded from decoded_image


def test_mathverse_reads_only_the_testmini_file(opened):
    choice, free = items(opened["mathverse"])
    assert len(opened["mathverse"]) == 2  # testmini_text_only.parquet is not the split
    assert (choice.answer, choice.meta["multiple_choice"]) == ("B", True)
    assert (free.answer, free.meta["multiple_choice"]) == ("\\frac{1}{2}", False)


def test_mathvision_from_the_datasets_cache(opened):
    choice, free = items(opened["mathvision"])
    assert choice.question == "Which shape comes next?\nChoices:\n(A) 4\n(B) 6\n(C) 8\n(D) 10\n(E) 12"
    assert (choice.answer, choice.meta["num_choices"]) == ("C", 5)
    assert free.question == "How long is the side?" and free.answer == "2\\sqrt{2}"


RED, GREEN, BLUE, PURPLE, ORANGE = (255, 0, 0), (0, 128, 0), (0, 0, 255), (128, 0, 128), (255, 165, 0)


def colours(item):
    return [tuple(int(v) for v in image[0, 0]) for image in item.images]


def test_mmmu_subjects_options_and_multi_image_questions(opened):
    suite = opened["mmmu"]
    first, two_images, open_question, by_options = items(suite)
    assert first.question == "<image 1> What is the total?\n(A) $10\n(B) $20\n(C) $30"
    assert first.answer == "B" and first.choices == ("$10", "$20", "$30")
    assert colours(first) == [RED] and first.more_images == ()
    assert open_question.answer == ["1889", "1890"] and not open_question.meta["multiple_choice"]
    # two images: image_1 then image_2 (the order of i, not of mention); tags kept as they are
    assert colours(two_images) == [GREEN, BLUE] and two_images.meta["num_images"] == 2
    assert two_images.image.shape == (48, 64, 3) and two_images.more_images[0].shape == (48, 96, 3)
    assert two_images.question == "Is <image 2> darker than <image 1>?\n(A) yes\n(B) no"
    # tags in the options count; image_2 is empty and image_5 unreferenced, so images 1, 3, 4
    # are shown and the tags renumbered to their positions
    assert colours(by_options) == [PURPLE, ORANGE, PURPLE]
    assert by_options.choices == ("<image 3>", "<image 2>")
    assert by_options.question == ("Which option has the colour of <image 1>?\n(A) <image 3>"
                                   "\n(B) <image 2>")
    assert suite.skips.count("mmmu") == 0


def test_mmmu_multi_image_skip_option_restores_the_skip(fixtures):
    root, specs = fixtures
    (suite,) = open_suites([specs["mmmu"] + ";multi_image=skip"], cache_dir=f"{root}/cache")
    kept = items(suite)
    assert [item.id for item in kept] == ["validation_Accounting_1", "validation_Art_1"]
    assert suite.skips.reasons("mmmu") == {"multi_image": 2}


def test_mmmu_images_rule_and_bad_rows():
    """Hand-worked rows of `mmmu_images`: tags in index order, each image once; no tag: the
    filled columns; a referenced empty column is a bad row."""
    row = {"image_1": "a", "image_2": "b", "image_3": "c"}
    assert suites.mmmu_images(row, ["<image 3> vs <image 1> vs <image 3>"]) == (["a", "c"], [1, 3])
    assert suites.mmmu_images(row, ["no tags"]) == (["a", "b", "c"], [])
    with pytest.raises(suites.BadRecord, match="image_4 is empty"):
        suites.mmmu_images(row, ["<image 4>"])
    with pytest.raises(suites.BadRecord, match="no image"):
        suites.mmmu_images({}, ["question"])


def test_multi_image_option_is_for_mmmu_only(fixtures):
    root, specs = fixtures
    with pytest.raises(ValueError, match="MMMU and MMMU-Pro only"):
        suites.parse_suite_spec("ai2d=/x;multi_image=skip")
    with pytest.raises(ValueError, match="MMMU and MMMU-Pro only"):
        suites.parse_suite_spec("mmmu=/x;multi_image=first")
    with pytest.raises(ValueError, match="multi_image must be one of"):
        suites.open_suite("mmmu", f"{root}/MMMU", multi_image="first")


def test_mmmu_pro_config_selects_the_subdirectory(fixtures):
    root, _ = fixtures
    standard = suites.open_suite("mmmu_pro", f"{root}/MMMU_Pro")
    item = standard.load(0)
    assert item.answer == "J" and item.meta["num_choices"] == 10
    vision = suites.open_suite("mmmu_pro", f"{root}/MMMU_Pro", config="vision").load(0)
    assert vision.question == suites.MMMU_PRO_VISION_QUESTION and vision.answer == "C"


def test_ai2d_from_save_to_disk_index_answers_become_letters(opened):
    first, second = items(opened["ai2d"])
    assert first.question == "Which stage is the larva?\nA. egg\nB. larva\nC. pupa\nD. adult"
    assert (first.answer, second.answer) == ("B", "A")


def test_mmbench_hint_and_missing_options(opened):
    first, second, third, *copies = items(opened["mmbench"])
    assert first.question == ("A photo of a wall.\nWhat is the main colour?\nA. red\nB. blue"
                              "\nC. green\nD. black")
    assert second.question == "Which is larger?\nA. left\nB. right"  # hint "nan", C/D empty
    assert third.question == "What shape?\nA. circle\nB. square"  # C "" ends the options
    assert (first.id, second.answer) == ("241", "B")
    # the file's circular copies are read as they are, grouped by index % 1e6
    assert [(c.id, c.meta["group"], c.meta["rotation"], c.answer) for c in copies] == [
        ("1000241", 241, 1, "D"), ("2000241", 241, 2, "C"), ("3000241", 241, 3, "B"),
        ("1000242", 242, 1, "A")]
    assert copies[0].question.endswith("A. blue\nB. green\nC. black\nD. red")


def test_mmbench_circular_generate_matches_the_published_copies(fixtures):
    """Rotations made from the original rows equal the copies the file holds (worked by hand
    in make_fixtures), and question 243, which has no copies in the file, gets its own."""
    root, _ = fixtures
    published = items(suites.open_suite("mmbench", f"{root}/MMBench"))
    generated = items(suites.open_suite("mmbench", f"{root}/MMBench", circular="generate"))
    assert [(i.id, i.answer) for i in generated] == [
        ("241", "A"), ("1000241", "D"), ("2000241", "C"), ("3000241", "B"),
        ("242", "B"), ("1000242", "A"), ("243", "A"), ("1000243", "B")]
    by_id = {i.id: i for i in published}
    for item in generated:
        if item.id in by_id:
            assert (item.question, item.answer, item.choices) == (
                by_id[item.id].question, by_id[item.id].answer, by_id[item.id].choices)
    assert generated[-1].question == "What shape?\nA. square\nB. circle"
    off = items(suites.open_suite("mmbench", f"{root}/MMBench", circular="off"))
    assert [i.id for i in off] == ["241", "242", "243"]
    with pytest.raises(ValueError, match="MMBench only"):
        suites.open_suite("ai2d", f"{root}/ai2d_saved", circular="off")
    with pytest.raises(ValueError, match="circular='twice'"):
        suites.parse_suite_spec(f"mmbench={root}/MMBench;circular=twice")
    assert suites.parse_suite_spec("mmbench=/d;circular=generate")["circular"] == "generate"


def test_circular_views():
    # rows: 7 (original, 4 options), 1000007 (a copy), 8 (original, 2 options)
    assert suites.circular_views([7, 1000007, 8], [4, 4, 2], "auto") is None
    assert suites.circular_views([7, 1000007, 8], [4, 4, 2], "off") == [(0, 0), (2, 0)]
    assert suites.circular_views([7, 1000007, 8], [4, 4, 2], "generate") == [
        (0, 0), (0, 1), (0, 2), (0, 3), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="circular must be one of"):
        suites.circular_views([7], [4], "on")


def test_scienceqa_skips_text_only_questions(opened):
    suite = opened["scienceqa"]
    (only,) = items(suite)
    assert only.question == ("Context: Look at the picture.\nWhich animal is a mammal?\nA. frog"
                             "\nB. whale\nC. shark")
    assert only.answer == "B"
    assert suite.skips.reasons("scienceqa") == {"image": 1}


def test_vqa_style_suites_keep_their_answer_lists(opened):
    assert [i.answer for i in items(opened["chartqa"])] == [["45"], ["Brazil"]]
    infovqa = items(opened["infovqa"])
    assert [i.answer for i in infovqa] == [["42%", "42"], ["new york"]]
    assert len(opened["infovqa"]) == 2  # the DocVQA config's file is not read
    vizwiz = items(opened["vizwiz"])
    assert vizwiz[0].question.startswith("What is this?\nWhen the provided information")
    assert vizwiz[0].answer.count("unanswerable") == 6 and len(vizwiz[0].answer) == 10


def test_ocrbench_skips_a_corrupt_image_and_names_the_row(opened, caplog):
    suite = opened["ocrbench"]
    with pytest.raises(suites.BadRecord, match="OCRBench row 2"):
        suite.load(2)
    assert [i.meta["dataset"] for i in items(suite)] == ["IIIT5K", "HME100k"]
    assert suite.skips.reasons("ocrbench") == {"image": 1}


def test_ocrbench_v2_reads_every_type_and_skips_only_the_ignored_row(opened):
    suite = opened["ocrbench_v2"]
    loaded = items(suite)
    assert {i.meta["type"] for i in loaded} == set(ocrbench_v2.CATEGORIES)   # all 30 types
    assert len(loaded) == 32
    by_id = {i.id: i for i in loaded}
    counting, position, grounding = by_id["1"], by_id["3"], by_id["4"]
    assert (counting.meta["eval"], counting.answer) == ("regression", ["10"])
    assert position.meta["bbox"] == [10, 10, 50, 50] and position.meta["eval"] == ""
    assert grounding.answer == ["100", "200", "300", "400"]
    assert by_id["22"].meta["eval"] == ""              # the string "None" is no eval
    # the text metric sees the reference as written (a trailing space counts); VQA's is stripped
    assert by_id["7"].answer == ["a page "] and by_id["0"].answer == ["STOP"]
    assert by_id["7"].meta["meteor"] == ocrbench_v2_text.meteor_form()
    assert by_id["8"].meta["meteor"] and "meteor" not in by_id["31"].meta   # short answer vs choice
    spotting = by_id["18"]
    assert spotting.meta["bbox_list"] == [[10, 10, 100, 10, 100, 40, 10, 40],
                                          [200, 200, 300, 200, 300, 240, 200, 240]]
    assert spotting.meta["content"] == spotting.answer == ["STOP", "###"]
    assert by_id["13"].answer == ["| a | b |\n| --- | --- |\n| 1 | 2 |"]
    # the text translation row with an empty answer is left out, as published
    assert suite.skips.reasons("ocrbench_v2") == {"ignored": 1}


def test_ocrbench_v2_rows_with_unknown_types_or_eval_are_schema_errors():
    row = {"id": 1, "question": "q", "type": "math QA en", "answers": ["1"], "eval": "fuzzy"}
    with pytest.raises(suites.BadRecord, match="unknown eval 'fuzzy'") as error:
        suites.ocrbench_v2_row(row)
    assert error.value.kind == "schema"
    with pytest.raises(suites.BadRecord, match="unknown OCRBench v2 task type 'poetry en'"):
        suites.ocrbench_v2_row(dict(row, type="poetry en", eval=None))
    with pytest.raises(suites.BadRecord, match="no answers"):
        suites.ocrbench_v2_row(dict(row, eval=None, answers=[]))
    with pytest.raises(suites.BadRecord, match="neither HTML nor markdown") as error:
        suites.ocrbench_v2_row(dict(row, type="table parsing en", eval=None, answers=["<table>"]))
    assert error.value.kind == "schema"
    with pytest.raises(suites.BadRecord, match="chart parsing: the answer is not a dict"):
        suites.ocrbench_v2_row(dict(row, type="chart parsing en", eval=None, answers=["[1, 2]"]))
    spotting = dict(row, type="text spotting en", eval=None, answers=[])
    with pytest.raises(suites.BadRecord, match="1 and 2"):
        suites.ocrbench_v2_row(dict(spotting, bbox_list=[[0, 0, 9, 9]], content=["a", "b"]))
    with pytest.raises(suites.BadRecord, match="x, y pairs"):
        suites.ocrbench_v2_row(dict(spotting, bbox_list=[[0, 0, 9]], content=["a"]))
    with pytest.raises(suites.BadRecord, match="not a list of integer boxes"):
        suites.ocrbench_v2_row(dict(spotting, bbox_list=[["a", 0, 9, 9]], content=["a"]))
    with pytest.raises(suites.BadRecord, match="ignored") as error:
        suites.ocrbench_v2_row(dict(row, type="text translation cn", eval=None, answers=[""]))
    assert error.value.kind == "ignored"


def test_rec_suites_boxes_images_and_bad_rows(opened):
    suite = opened["refcoco/testA"]
    good = items(suite)
    assert [i.answer for i in good] == [(10.0, 5.0, 40.0, 30.0), (0.0, 0.0, 20.0, 60.0)]
    assert good[0].image.shape == (60, 80, 3)
    assert good[0].question.endswith("describes: the red cup.")
    assert suite.skips.reasons("refcoco/testA") == {"image": 1, "box": 1}
    (lisa,) = items(opened["lisa"])
    assert lisa.question == "Where would you sit to rest?" and lisa.answer == (4.0, 8.0, 60.0, 50.0)


def test_limit_keeps_the_first_rows(fixtures):
    root, specs = fixtures
    (suite,) = open_suites([specs["mathvista"]], limit=2)
    assert len(suite) == 2 and suite.load(1).id == "2"


# --------------------------------------------------------------------------- errors


def test_clear_errors_for_missing_data_and_bad_specs(fixtures, tmp_path):
    root, _ = fixtures
    with pytest.raises(FileNotFoundError, match="nowhere"):
        suites.open_suite("chartqa", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        suites.open_suite("chartqa", f"{root}/ChartQA", split="val")
    with pytest.raises(ValueError, match="no split 'validation'"):
        suites.open_suite("ai2d", f"{root}/ai2d_saved", split="validation")
    with pytest.raises(ValueError, match="several directories"):
        suites.open_suite("mmbench", f"{root}/MMBench", config="")
    with pytest.raises(ValueError, match="unknown benchmark suite 'mmlu'"):
        suites.parse_suite_spec("mmlu=/x")
    with pytest.raises(ValueError, match="cannot read option"):
        suites.parse_suite_spec("ai2d=/x;colour=red")
    assert suites.parse_suite_spec("mmmu_pro=/d;config=standard (4 options);split=test") == {
        "label": "mmmu_pro", "path": "/d", "config": "standard (4 options)", "split": "test"}


def test_rec_json_errors(tmp_path):
    bad = tmp_path / "refcoco_val.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="refcoco_val.json: not valid JSON"):
        suites.open_suite("refcoco/val", bad)
    lines = tmp_path / "refcoco_val.jsonl"
    lines.write_text('{"image": "a.jpg", "problem": "q", "solution": [0, 0, 1, 1]}\n{oops\n')
    suite = suites.open_suite("refcoco/val", lines, image_root=tmp_path)
    with pytest.raises(suites.BadRecord, match="row 1: schema: line 2 is not valid JSON"):
        suite.load(1)
    with pytest.raises(suites.BadRecord, match="cannot read"):
        suite.load(0)  # a.jpg does not exist
    escape = tmp_path / "esc.json"
    escape.write_text(json.dumps([{"image": "../../etc/passwd", "problem": "q",
                                   "solution": [0, 0, 1, 1]}]))
    with pytest.raises(suites.BadRecord, match="escapes image root"):
        suites.open_suite("lisa", escape, image_root=os.fspath(tmp_path)).load(0)
