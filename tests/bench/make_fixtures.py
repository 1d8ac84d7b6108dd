"""Tiny local copies of every benchmark in its published schema and layout (a few rows, small
PIL images), for offline tests of the adapters, scorers and the benchmarks_eval CLI.

    python -m tests.bench.make_fixtures OUT_DIR

Layouts (the published repositories'; columns as in their dataset cards):
  MathVista/data/testmini-00000-of-00001.parquet          AI4Math/MathVista
  MathVerse/testmini.parquet (+ testmini_text_only.parquet, not read)   AI4Math/MathVerse
  mathvision_cache/...-test.arrow + dataset_info.json     the datasets cache of MathLLMs/MathVision
  MMMU/{Accounting,Art}/validation-00000-of-00001.parquet  MMMU/MMMU (two subjects)
  MMMU_Pro/{standard (10 options),vision}/test-*.parquet  MMMU/MMMU_Pro
  ai2d_saved/ (save_to_disk DatasetDict, split test)      lmms-lab/ai2d
  MMBench/{en,cn}/dev-*.parquet (with circular copies)    lmms-lab/MMBench
  ScienceQA/data/test-*.parquet                           derek-thomas/ScienceQA
  ChartQA/data/test-*.parquet                             lmms-lab/ChartQA
  DocVQA/{InfographicVQA,DocVQA}/validation-*.parquet     lmms-lab/DocVQA
  VizWiz-VQA/data/val-00000-of-00001.parquet              lmms-lab/VizWiz-VQA
  OCRBench/data/test-*.parquet                            echo840/OCRBench
  OCRBench_v2/data/test-*.parquet                         ling99/OCRBench_v2
  rec_jsons_processed/{refcoco_testA,lisa_test}.json + coco/train2014/, lisa/   VLM-R1

Multi-image rows: MMMU Accounting_2 (two images, "<image 2>" named before "<image 1>") and
Art_2 (images referenced by its options; image_2 empty, image_5 not referenced).
Bad rows, on purpose: ScienceQA one text-only question;
OCRBench one corrupt image; OCRBench v2 a text translation row with an empty answer
(ignored, as published); RefCOCO one missing
image file and one malformed box. MMBench question 241 (4 options) has its 3 circular copies
(index + k * 1e6, options rotated by k), question 242 (2 options) its 1, question 243 none.
`write_fixtures` returns the ``LABEL=PATH[;...]`` spec of each suite.
"""

from __future__ import annotations

import io
import json
import os
import sys

from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def image(k: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small solid image (width, height), its colour chosen by ``k``."""
    return Image.new("RGB", size, COLORS[k % len(COLORS)])


def png_bytes(k: int, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    image(k, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(rows: dict, features, path: str) -> str:
    from datasets import Dataset

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(path)
    return path


def _features(spec: dict):
    from datasets import Features, Sequence, Value
    from datasets import Image as ImageFeature

    kinds = {"str": Value("string"), "int": Value("int64"), "float": Value("float64"),
             "image": ImageFeature(), "strs": Sequence(Value("string"))}
    return Features({name: kinds[kind] if isinstance(kind, str) else kind
                     for name, kind in spec.items()})


def mathvista(root: str) -> str:
    from datasets import Value

    metadata = {"category": Value("string"), "context": Value("string"), "grade": Value("string"),
                "img_height": Value("int64"), "img_width": Value("int64"),
                "language": Value("string"), "skills": [Value("string")],
                "source": Value("string"), "split": Value("string"), "task": Value("string")}
    features = _features({"pid": "str", "question": "str", "image": "str", "decoded_image": "image",
                          "choices": "strs", "unit": "str", "precision": "float", "answer": "str",
                          "question_type": "str", "answer_type": "str", "metadata": metadata,
                          "query": "str"})
    meta = dict(category="math-targeted-vqa", context="geometry diagram", grade="high school",
                img_height=48, img_width=64, language="english", skills=["geometry reasoning"],
                source="Geometry3K", split="testmini", task="geometry problem solving")
    rows = {
        "pid": ["1", "2", "3"],
        "question": ["Find the angle.", "How many circles?", "What is the ratio?"],
        "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"],
        "decoded_image": [image(0), image(1), image(2)],
        "choices": [["145°", "35°", "55°", "125°"], None, None],
        "unit": [None, None, None], "precision": [None, None, 2.0],
        "answer": ["145°", "3", "1.45"],
        "question_type": ["multi_choice", "free_form", "free_form"],
        "answer_type": ["text", "integer", "float"], "metadata": [meta] * 3,
        "query": ["Hint: Please answer the question and provide the correct option letter, e.g., "
                  "A, B, C, D, at the end.\nQuestion: Find the angle.\nChoices:\n(A) 145°\n(B) 35°"
                  "\n(C) 55°\n(D) 125°",
                  "Hint: Please answer the question requiring an integer answer and provide the "
                  "final value, e.g., 1, 2, 3, at the end.\nQuestion: How many circles?",
                  "Hint: Please answer the question requiring a floating-point number with two "
                  "decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end."
                  "\nQuestion: What is the ratio?"],
    }
    _write(rows, features, f"{root}/MathVista/data/testmini-00000-of-00001.parquet")
    return f"mathvista={root}/MathVista"


def mathverse(root: str) -> str:
    from datasets import Value

    metadata = {"split": Value("string"), "source": Value("string"), "subject": Value("string"),
                "subfield": Value("string")}
    features = _features({"sample_index": "str", "problem_index": "str", "problem_version": "str",
                          "question": "str", "image": "image", "answer": "str",
                          "question_type": "str", "metadata": metadata, "query_wo": "str",
                          "query_cot": "str", "question_for_eval": "str"})
    meta = dict(split="testmini", source="GeoQA", subject="Plane Geometry", subfield="Angle")
    rows = {
        "sample_index": ["1", "2"], "problem_index": ["1", "2"],
        "problem_version": ["Text Dominant", "Vision Intensive"],
        "question": ["As shown in the figure, find the angle.\nChoices:\nA:30°\nB:60°\nC:90°",
                     "Find x."],
        "image": [image(3), image(4)], "answer": ["B", "\\frac{1}{2}"],
        "question_type": ["multi-choice", "free-form"], "metadata": [meta] * 2,
        "query_wo": ["q1", "q2"], "query_cot": ["q1", "q2"], "question_for_eval": ["q1", "q2"],
    }
    _write(rows, features, f"{root}/MathVerse/testmini.parquet")
    one = {key: value[:1] for key, value in rows.items()}
    _write(one, features, f"{root}/MathVerse/testmini_text_only.parquet")  # not the split
    return f"mathverse={root}/MathVerse"


def mathvision(root: str) -> str:
    """MathVision read once through the datasets cache (its arrow + dataset_info.json)."""
    import datasets

    features = _features({"id": "str", "question": "str", "options": "strs", "image": "str",
                          "decoded_image": "image", "answer": "str", "solution": "str",
                          "level": "int", "subject": "str"})
    rows = {"id": ["1", "2"],
            "question": ["<image1>Which shape comes next?", "<image1>How long is the side?"],
            "options": [["4", "6", "8", "10", "12"], []], "image": ["images/1.jpg", "images/2.jpg"],
            "decoded_image": [image(5), image(0)], "answer": ["C", "2\\sqrt{2}"],
            "solution": [None, None], "level": [2, 3], "subject": ["logic", "metric geometry"]}
    parquet = _write(rows, features, f"{root}/mathvision_src/data/test-00000-of-00001.parquet")
    datasets.load_dataset("parquet", data_files={"test": parquet},
                          cache_dir=f"{root}/mathvision_cache")
    return f"mathvision={root}/mathvision_cache"


def _mmmu_features(count: int = 7):
    spec = {"id": "str", "question": "str", "options": "str", "explanation": "str"}
    spec.update({f"image_{k}": "image" for k in range(1, count + 1)})
    spec.update({"img_type": "str", "answer": "str", "topic_difficulty": "str",
                 "question_type": "str", "subfield": "str"})
    return _features(spec)


def _mmmu_rows(ids, questions, options, images, answers, types):
    rows = {"id": ids, "question": questions, "options": options, "explanation": [""] * len(ids)}
    for k in range(1, 8):
        rows[f"image_{k}"] = [imgs[k - 1] if len(imgs) >= k else None for imgs in images]
    rows.update({"img_type": ["['Diagrams']"] * len(ids), "answer": answers,
                 "topic_difficulty": ["Easy"] * len(ids), "question_type": types,
                 "subfield": ["x"] * len(ids)})
    return rows


def mmmu(root: str) -> str:
    features = _mmmu_features()
    _write(_mmmu_rows(["validation_Accounting_1", "validation_Accounting_2"],
                      ["<image 1> What is the total?", "Is <image 2> darker than <image 1>?"],
                      ["['$10', '$20', '$30']", "['yes', 'no']"], [[image(0)], [image(1), image(2, (96, 48))]],
                      ["B", "A"], ["multiple-choice", "multiple-choice"]),
           features, f"{root}/MMMU/Accounting/validation-00000-of-00001.parquet")
    # Art_2: options reference images; image_2 is empty and image_5 is not referenced
    _write(_mmmu_rows(["validation_Art_1", "validation_Art_2"],
                      ["<image 1> In which year?", "Which option has the colour of <image 1>?"],
                      ["[]", "['<image 4>', '<image 3>']"],
                      [[image(3)], [image(4), None, image(5), image(4), image(0)]],
                      ["['1889', '1890']", "A"], ["open", "multiple-choice"]),
           features, f"{root}/MMMU/Art/validation-00000-of-00001.parquet")
    return f"mmmu={root}/MMMU"


def mmmu_pro(root: str) -> str:
    spec = {"id": "str", "question": "str", "options": "str", "explanation": "str"}
    spec.update({f"image_{k}": "image" for k in range(1, 8)})
    spec.update({"img_type": "str", "answer": "str", "topic_difficulty": "str", "subject": "str"})
    rows = {"id": ["test_Art_1"], "question": ["<image 1> Which style?"],
            "options": [str([f"style {k}" for k in range(10)])], "explanation": [""],
            "image_1": [image(4)], **{f"image_{k}": [None] for k in range(2, 8)},
            "img_type": ["['Paintings']"], "answer": ["J"], "topic_difficulty": ["Hard"],
            "subject": ["Art"]}
    _write(rows, _features(spec), f"{root}/MMMU_Pro/standard (10 options)/test-00000-of-00001.parquet")
    vision = {"id": ["test_Art_1"], "image": [image(5)], "options": [str(["a", "b", "c"])],
              "answer": ["C"], "subject": ["Art"]}
    _write(vision, _features({"id": "str", "image": "image", "options": "str", "answer": "str",
                              "subject": "str"}), f"{root}/MMMU_Pro/vision/test-00000-of-00001.parquet")
    return f"mmmu_pro={root}/MMMU_Pro"


def ai2d(root: str) -> str:
    from datasets import Dataset, DatasetDict

    features = _features({"question": "str", "options": "strs", "answer": "str", "image": "image"})
    rows = {"question": ["Which stage is the larva?", "What eats the grass?"],
            "options": [["egg", "larva", "pupa", "adult"], ["rabbit", "fox"]],
            "answer": ["1", "0"], "image": [image(0), image(1)]}
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(
        f"{root}/ai2d_saved")
    return f"ai2d={root}/ai2d_saved"


def mmbench(root: str) -> str:
    features = _features({"index": "int", "question": "str", "hint": "str", "A": "str",
                          "B": "str", "C": "str", "D": "str", "answer": "str", "category": "str",
                          "image": "image", "source": "str", "l2-category": "str",
                          "comment": "str", "split": "str"})
    # copy k of a question: option j is option (j + k) mod n of the original (worked by hand)
    rows = {"index": [241, 242, 243, 1000241, 2000241, 3000241, 1000242],
            "question": ["What is the main colour?", "Which is larger?", "What shape?"]
            + ["What is the main colour?"] * 3 + ["Which is larger?"],
            "hint": ["A photo of a wall.", "nan", None] + ["A photo of a wall."] * 3 + ["nan"],
            "A": ["red", "left", "circle", "blue", "green", "black", "right"],
            "B": ["blue", "right", "square", "green", "black", "red", "left"],
            "C": ["green", None, "", "black", "red", "blue", None],
            "D": ["black", None, None, "red", "blue", "green", None],
            "answer": ["A", "B", "A", "D", "C", "B", "A"],
            "category": ["attribute", "spatial", "shape", "attribute", "attribute", "attribute",
                         "spatial"],
            "image": [image(0), image(2), image(4), image(0), image(0), image(0), image(2)],
            "source": ["x"] * 7, "l2-category": ["a"] * 7, "comment": [""] * 7, "split": ["dev"] * 7}
    _write(rows, features, f"{root}/MMBench/en/dev-00000-of-00001.parquet")
    _write(rows, features, f"{root}/MMBench/cn/dev-00000-of-00001.parquet")  # another config
    return f"mmbench={root}/MMBench"


def scienceqa(root: str) -> str:
    from datasets import Value

    # derek-thomas/ScienceQA's card: answer is int8 (the 0-based index of the right choice)
    features = _features({"image": "image", "question": "str", "choices": "strs",
                          "answer": Value("int8"), "hint": "str", "task": "str", "grade": "str",
                          "subject": "str", "topic": "str", "category": "str", "skill": "str",
                          "lecture": "str", "solution": "str"})
    rows = {"image": [image(1), None], "question": ["Which animal is a mammal?", "What is 2+2?"],
            "choices": [["frog", "whale", "shark"], ["3", "4"]], "answer": [1, 1],
            "hint": ["Look at the picture.", ""], "task": ["closed choice"] * 2,
            "grade": ["grade4"] * 2, "subject": ["natural science"] * 2, "topic": ["biology"] * 2,
            "category": ["x"] * 2, "skill": ["x"] * 2, "lecture": [""] * 2, "solution": [""] * 2}
    _write(rows, features, f"{root}/ScienceQA/data/test-00000-of-00001.parquet")
    return f"scienceqa={root}/ScienceQA"


def chartqa(root: str) -> str:
    features = _features({"type": "str", "question": "str", "answer": "str", "image": "image"})
    rows = {"type": ["human_test", "augmented_test"],
            "question": ["What is the highest value?", "Which country is first?"],
            "answer": ["45", "Brazil"], "image": [image(2), image(3)]}
    _write(rows, features, f"{root}/ChartQA/data/test-00000-of-00001.parquet")
    return f"chartqa={root}/ChartQA"


def infovqa(root: str) -> str:
    features = _features({"questionId": "str", "question": "str", "answers": "strs",
                          "answer_type": "strs", "image": "image", "image_url": "str",
                          "operation/reasoning": "strs", "ocr": "str", "data_split": "str"})
    rows = {"questionId": ["98313", "98314"],
            "question": ["What percentage use phones?", "Which city is named?"],
            "answers": [["42%", "42"], ["new york"]], "answer_type": [["single span"]] * 2,
            "image": [image(4), image(5)], "image_url": ["", ""],
            "operation/reasoning": [[], []], "ocr": ["", ""], "data_split": ["val", "val"]}
    _write(rows, features, f"{root}/DocVQA/InfographicVQA/validation-00000-of-00001.parquet")
    docvqa = {"questionId": ["1"], "question": ["doc?"], "answers": [["x"]],
              "answer_type": [["x"]], "image": [image(0)], "image_url": [""],
              "operation/reasoning": [[]], "ocr": [""], "data_split": ["val"]}
    _write(docvqa, features, f"{root}/DocVQA/DocVQA/validation-00000-of-00001.parquet")
    return f"infovqa={root}/DocVQA"


def vizwiz(root: str) -> str:
    features = _features({"question_id": "str", "image": "image", "question": "str",
                          "answers": "strs", "category": "str"})
    rows = {"question_id": ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"],
            "image": [image(0), image(1)], "question": ["What is this?", "What colour?"],
            "answers": [["unanswerable"] * 6 + ["bottle"] * 4, ["green"] * 10],
            "category": ["unanswerable", "other"]}
    path = _write(rows, features, f"{root}/VizWiz-VQA/data/val-00000-of-00001.parquet")
    return f"vizwiz={path}"


def ocrbench(root: str) -> str:
    from datasets import Image as ImageFeature

    features = _features({"dataset": "str", "question": "str", "question_type": "str",
                          "answer": "strs", "image": "image"})
    rows = {"dataset": ["IIIT5K", "HME100k", "IIIT5K"],
            "question": ["what is written in the image?", "Please write out the expression.",
                         "what is written in the image?"],
            "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression "
                              "Recognition", "Regular Text Recognition"],
            "answer": [["STOP"], ["x^{2}"], ["corrupt"]],
            "image": [{"bytes": png_bytes(0), "path": None}, {"bytes": png_bytes(1), "path": None},
                      {"bytes": b"not an image", "path": None}]}
    features["image"] = ImageFeature()
    _write(rows, features, f"{root}/OCRBench/data/test-00000-of-00001.parquet")
    return f"ocrbench={root}/OCRBench"


def ocrbench_v2(root: str) -> str:
    """ling99/OCRBench_v2 rows: every one of the 30 task types (table parsing en twice, HTML
    and markdown; handwritten answer extraction cn twice, choice and short answer), one row
    whose eval is the string "None" (as the upload script writes a missing eval), and one
    text translation row with an empty answer (the published "ignore")."""
    from datasets import Sequence, Value

    features = _features({"id": Value("int32"), "dataset_name": "str", "question": "str",
                          "type": "str", "answers": "strs", "image": "image", "eval": "str",
                          "bbox": Sequence(Value("int32")),
                          "bbox_list": Sequence(Sequence(Value("int32"))), "content": "strs"})
    # (id, dataset_name, question, type, answers, eval, bbox, bbox_list, content)
    rows = [
        (0, "IIIT5K", "What is written in the image?", "text recognition en", ["STOP"], None, None),
        (1, "textcount", "How many times does the word 'the' appear?", "text counting en", ["10"],
         "regression", None),
        (2, "sroie", "Extract the total and the date as JSON.", "key information extraction en",
         ['{"total": "12.50", "date": ["2020-01-01", "01/01/2020"]}'], None, None),
        (3, "docvqa", "What is the title? Answer with a dict with 'answer' and 'bbox'.",
         "VQA with position en", ["hello"], None, [10, 10, 50, 50]),
        (4, "grounding", "Where is the word 'exit'? Output [x1, y1, x2, y2] in 0-1000.",
         "text grounding en", ["100", "200", "300", "400"], None, None),
        (5, "cn_vqa", "图中写的是什么？", "cognition VQA cn", ["你好"], None, None),
        (6, "formula", "Write the formula in LaTeX.", "formula recognition en", ["x^{2}"], None, None),
        (7, "docs", "Read all the text in the image.", "full-page OCR en", ["a page "], None, None),
        (8, "hw", "请提取简答题的答案。", "handwritten answer extraction cn", ["答案"], None, None),
        (9, "fine", "What is written in the red box?", "fine-grained text recognition en",
         ["EXIT ONLY"], None, None),
        (10, "cn_page", "请识别图中所有文字。", "full-page OCR cn", ["你好世界"], None, None),
        (11, "translate", "请把图中的英文翻译成中文。", "text translation cn", ["出口"], None, None),
        (12, "pubtabnet", "Convert the table into HTML.", "table parsing en",
         ["<table><tr><td>a</td><td>1</td></tr></table>"], None, None),
        (13, "wtq", "Write the table in markdown.", "table parsing en",
         ["| a | b |\n| --- | --- |\n| 1 | 2 |"], None, None),
        (14, "cn_table", "请用HTML输出表格。", "table parsing cn", ["<table><tr><td>名称</td></tr></table>"],
         None, None),
        (15, "chart", "Convert the chart into a Python dict.", "chart parsing en",
         ['{"title": "Sales", "2020": 12}'], None, None),
        (16, "doc_en", "Convert the page to markdown.", "document parsing en",
         ["# Title\nSome text"], None, None),
        (17, "doc_cn", "请把文档转成markdown。", "document parsing cn", ["# 标题\n正文"], None, None),
        (18, "spotting", "Spot all the text: [x1, y1, x2, y2, text] in 0-1000.", "text spotting en",
         [], None, None, [[10, 10, 100, 10, 100, 40, 10, 40], [200, 200, 300, 200, 300, 240, 200, 240]],
         ["STOP", "###"]),
        (19, "kim", "Map the keys to values.", "key information mapping en", ['{"name": "Ann"}'],
         None, None),
        (20, "kie_cn", "提取总金额。", "key information extraction cn", ["{'总金额': '12'}"], None, None),
        (21, "formula_cn", "写出公式。", "formula recognition cn", ["\\text{面积}=3"], None, None),
        (22, "mathqa", "What is 2 + 3?", "math QA en", ["5"], "None", None),
        (23, "reasoning", "Which sign is red?", "reasoning VQA en", ["stop sign"], None, None),
        (24, "science", "Which is a mammal? A. fish B. dog", "science QA en", ["B"],
         "multiple choice", None),
        (25, "app", "Which button saves the file?", "APP agent en", ["save"], None, None),
        (26, "ascii", "What animal does the ASCII art show?", "ASCII art classification en",
         ["cat"], None, None),
        (27, "doccls", "What kind of document is this?", "document classification en",
         ["letter"], None, None),
        (28, "cogvqa", "What is the brand?", "cognition VQA en", ["ACME"], "case sensitive", None),
        (29, "diagram", "Which stage comes first?", "diagram QA en", ["egg"], None, None),
        (30, "reason_cn", "哪个更大？", "reasoning VQA cn", ["苹果"], None, None),
        (31, "hw_choice", "请提取选择题的答案。", "handwritten answer extraction cn", ["AB"], None, None),
        (32, "translate", "请翻译。", "text translation cn", [""], None, None),
    ]
    columns = {"id": [], "dataset_name": [], "question": [], "type": [], "answers": [],
               "image": [], "eval": [], "bbox": [], "bbox_list": [], "content": []}
    for k, (id_, name, question, task, answers, method, box, *spotting) in enumerate(rows):
        boxes, content = spotting or (None, None)
        for key, value in (("id", id_), ("dataset_name", name), ("question", question),
                           ("type", task), ("answers", answers), ("image", image(k)),
                           ("eval", method), ("bbox", box), ("bbox_list", boxes), ("content", content)):
            columns[key].append(value)
    _write(columns, features, f"{root}/OCRBench_v2/data/test-00000-of-00001.parquet")
    return f"ocrbench_v2={root}/OCRBench_v2"


def rec(root: str) -> tuple[str, str]:
    """VLM-R1 rec_jsons_processed json lists + image folders (RefCOCO testA and LISA test)."""
    os.makedirs(f"{root}/coco/train2014", exist_ok=True)
    os.makedirs(f"{root}/lisa/test", exist_ok=True)
    image(0, (80, 60)).save(f"{root}/coco/train2014/COCO_train2014_000000000009.jpg")
    image(1, (80, 60)).save(f"{root}/coco/train2014/COCO_train2014_000000000025.jpg")
    image(2, (64, 64)).save(f"{root}/lisa/test/1.jpg")
    question = "Please provide the bounding box coordinate of the region this sentence describes: {}."
    refcoco = [
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": question.format("the red cup"),
         "solution": [10, 5, 40, 30], "normalized_solution": [125, 83, 500, 500],
         "normal_caption": "the red cup"},
        {"image": "train2014/COCO_train2014_000000000025.jpg", "problem": question.format("left man"),
         "solution": [0, 0, 20, 60], "normalized_solution": [0, 0, 250, 1000],
         "normal_caption": "left man"},
        {"image": "train2014/COCO_train2014_000000099999.jpg", "problem": question.format("missing"),
         "solution": [0, 0, 5, 5], "normal_caption": "missing"},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "problem": question.format("bad box"),
         "solution": [30, 5, 10, 30], "normal_caption": "bad box"},
    ]
    lisa = [{"image": "test/1.jpg", "problem": "Where would you sit to rest?",
             "solution": [4, 8, 60, 50], "normal_caption": "the sofa"}]
    os.makedirs(f"{root}/rec_jsons_processed", exist_ok=True)
    with open(f"{root}/rec_jsons_processed/refcoco_testA.json", "w") as handle:
        json.dump(refcoco, handle)
    with open(f"{root}/rec_jsons_processed/lisa_test.json", "w") as handle:
        json.dump(lisa, handle)
    return (f"refcoco/testA={root}/rec_jsons_processed/refcoco_testA.json;image_root={root}/coco",
            f"lisa={root}/rec_jsons_processed/lisa_test.json;image_root={root}/lisa")


def write_fixtures(root: str) -> dict[str, str]:
    """Writes every suite under ``root``; returns {label: spec}."""
    import datasets

    datasets.disable_progress_bars()
    specs = [mathvista(root), mathverse(root), mathvision(root), mmmu(root), mmmu_pro(root),
             ai2d(root), mmbench(root), scienceqa(root), chartqa(root), infovqa(root),
             vizwiz(root), ocrbench(root), ocrbench_v2(root), *rec(root)]
    return {spec.split("=", 1)[0]: spec for spec in specs}


if __name__ == "__main__":
    for label, spec in write_fixtures(sys.argv[1]).items():
        print(f"{label}: {spec}")
