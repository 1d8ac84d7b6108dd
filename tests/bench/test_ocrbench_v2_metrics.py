"""OCRBench v2's text, table / chart / document parsing and text spotting metrics on cases
worked by hand from the published rules (eval_scripts: page_ocr_metric.py, TEDS_metric.py,
spotting_eval/script.py), identity and junk predictions, and our tree edit distance against
zss and apted (the packages the published TEDS / STEDS run)."""

import math
import random
import types

import apted
import pytest
import zss
from apted.helpers import Tree

from recap_jax.bench import ocrbench_v2 as v2
from recap_jax.bench import ocrbench_v2_text as text
from recap_jax.bench import scoring, spotting, teds
from recap_jax.bench.tree_edit import tree_edit_distance

# --------------------------------------------------------------------------- BLEU, METEOR, F, edit


def test_bleu_by_hand():
    # p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, equal lengths -> no brevity penalty
    assert text.bleu("a b c d f".split(), "a b c d e".split()) == pytest.approx(0.2 ** 0.25)
    # every n-gram matches, 4 words against 6: brevity penalty exp(1 - 6/4)
    assert text.bleu("a b c d".split(), "a b c d e f".split()) == pytest.approx(math.exp(-0.5))
    assert text.bleu("a b c d".split(), "a b c d".split()) == 1.0
    # no bigram match: NLTK's unsmoothed BLEU uses the smallest float for p2 -> about 1e-77
    assert 0 < text.bleu("the the the the".split(), "the cat".split()) < 1e-70
    assert text.bleu([], ["a"]) == 0.0 and text.bleu(["x"], ["a"]) == 0.0


def test_meteor_by_hand_exact_then_stem_then_chunks():
    # "the", "sat" exact, "cats" ~ "cat" by Porter stem: 3 matches, P = 1, R = 3/4, one chunk
    fmean = 0.75 / (0.9 * 1 + 0.1 * 0.75)
    expected = (1 - 0.5 * (1 / 3) ** 3) * fmean
    assert text.meteor("the cats sat".split(), "The cat sat down".split(), wordnet=None) == \
        pytest.approx(expected)
    # reversed order: 2 chunks of 1 match each -> penalty 0.5 * (2 / 2)^3
    assert text.meteor(["b", "a"], ["a", "b"], wordnet=None) == pytest.approx(0.5)
    assert text.meteor([], ["a"], wordnet=None) == 0.0
    assert text.meteor(["x"], ["a"], wordnet=None) == 0.0


def test_meteor_wordnet_stage_only_with_a_reader():
    lemma = types.SimpleNamespace(name=lambda: "auto")
    synset = types.SimpleNamespace(lemmas=lambda: [lemma])
    reader = types.SimpleNamespace(synsets=lambda word: [synset] if word == "car" else [])
    # one synonym match: P = R = 1, one chunk of one -> 1 - 0.5
    assert text.meteor(["car"], ["auto"], wordnet=reader) == pytest.approx(0.5)
    assert text.meteor(["car"], ["auto"], wordnet=None) == 0.0
    # as in NLTK, synonyms are looked up after stemming: "automobile" left as "automobil"
    # no longer equals the synonym "automobile"
    named = types.SimpleNamespace(name=lambda: "automobile")
    stemmed = types.SimpleNamespace(synsets=lambda word: [types.SimpleNamespace(lemmas=lambda: [named])])
    assert text.meteor(["car"], ["automobile"], wordnet=stemmed) == 0.0
    # NLTK's wordnet data is never downloaded: its absence means the exact + stem form
    assert text.meteor_form() in ("exact+stem", "exact+stem+wordnet")


def test_set_f_measure_and_edit_distance_by_hand():
    # shared {b, c}: P = 2/3, R = 2/4 -> 1 / (0.5 / P + 0.5 / R) = 4/7
    assert text.set_f_measure("a b c".split(), "b c d e".split()) == pytest.approx(4 / 7)
    assert text.set_f_measure([], ["a"]) == 0.0 and text.set_f_measure(["x"], ["a"]) == 0.0
    assert text.edit_distance_ratio("kitten", "sitting") == pytest.approx(3 / 7)


def test_ocr_text_score_by_hand_identity_and_junk():
    # bleu 0.2^0.25; meteor 4 matches of 5, one chunk: (1 - 0.5 / 64) * 0.8; F 0.8;
    # edit 1 of 9 characters
    expected = (0.2 ** 0.25 + (1 - 0.5 / 64) * 0.8 + 0.8 + (1 - 1 / 9)) / 4
    assert text.ocr_text_score("a b c d f", "a b c d e") == pytest.approx(expected)
    # a perfect prediction: METEOR keeps its fragmentation penalty 0.5 / n^3 (n = 4 words)
    assert text.ocr_text_score("a b c d", "a b c d") == pytest.approx((4 - 0.5 / 64) / 4)
    # Chinese is cut by jieba: 我 / 爱 / 北京 / 天安门, so the same 4-word identity value
    assert text.words("我爱北京天安门", "")[0] == ["我", "爱", "北京", "天安门"]
    assert text.ocr_text_score("我爱北京天安门", "我爱北京天安门") == pytest.approx((4 - 0.5 / 64) / 4)
    assert text.ocr_text_score("", "hello world") == 0.0
    assert text.ocr_text_score("qqqqqqqqqqqq", "hello world") == 0.0   # nothing shared


def test_text_types_and_short_answers_dispatch_to_the_text_metric():
    value = text.ocr_text_score("a b c d f", "a b c d e")
    for task in ("full-page OCR en", "full-page OCR cn", "fine-grained text recognition en",
                 "text translation cn"):
        assert v2.score_item(task, "a b c d f", ["a b c d e"]) == pytest.approx(value)
    short = "请回答简答题"
    assert v2.score_item("handwritten answer extraction cn", "a b c d f", ["a b c d e"],
                         question=short) == pytest.approx(value)
    # a choice question keeps the containment rule
    assert v2.score_item("handwritten answer extraction cn", "A、B", ["AB"], question="选择题") == 1.0
    assert v2.is_ignored("text translation cn", [""]) and not v2.is_ignored("text translation cn", ["x"])


# --------------------------------------------------------------------------- TEDS


def row(*cells):
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def table(*rows):
    return "<html><body><table>" + "".join(rows) + "</table></body></html>"


def test_teds_by_hand():
    gold = table(row("a", "b"))                          # tr, td, td: 3 nodes
    assert teds.teds(gold, gold) == 1.0
    # one cell's content fully wrong: rename cost lev("c", "b") / 1 = 1
    assert teds.teds(table(row("a", "c")), gold) == pytest.approx(1 - 1 / 3)
    # half a cell wrong: lev("ac", "ab") / 2 over 2 nodes (tr, td)
    assert teds.teds(table(row("ac")), table(row("ab"))) == pytest.approx(1 - 0.5 / 2)
    # a missing row: insert tr + td over 4 nodes
    assert teds.teds(table(row("x")), table(row("x"), row("y"))) == pytest.approx(0.5)
    # a span differs: rename costs 1 whatever the content
    spanned = "<html><body><table><tr><td colspan='2'>a</td></tr></table></body></html>"
    assert teds.teds(spanned, table(row("a"))) == pytest.approx(0.5)


def test_html_table_parsing_reads_broken_html_as_libxml2_does_and_junk_scores_zero():
    gold = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
    # cells and rows closed by the next cell / row, the table by the end of the text
    assert teds.html_table_score("Here:\n<table><tr><td>a<td>b<tr><td>c", gold) == 1.0
    assert teds.html_table_score("```html\n" + gold + "\n```", gold) == 1.0
    for junk in ("", "no table here", "<<<>>>", "<table>", "<body><div><table><tr><td>a</td></tr></table></div>",
                 "<table><tr><td colspan='x'>a</td></tr></table>"):
        assert teds.html_table_score(junk, gold) == 0.0, junk
    assert teds.html_table_score(gold, gold) == 1.0


def test_markdown_tables_and_the_html_or_markdown_question():
    gold = "| x | y |\n| --- | --- |\n| 1 | a |\n| 2 | b |"
    assert teds.markdown_table_to_html(gold) == table(row("x", "y"), row("1", "a"), row("2", "b"))
    # without a header its second row is taken for the separator: 1 row (3 nodes) of gold's
    # 3 rows (9 nodes) -> 6 insertions
    assert teds.table_parsing_score("| 1 | a |\n| 2 | b |", gold, "as markdown") == pytest.approx(1 / 3)
    assert v2.score_item("table parsing en", gold, [gold], question="Write it in Markdown") == 1.0
    html = "<table><tr><td>1</td></tr></table>"
    assert v2.score_item("table parsing en", html, [html], question="Output HTML") == 1.0
    assert v2.score_item("table parsing cn", html, [html], question="请输出表格") == 1.0
    with pytest.raises(ValueError, match="neither HTML nor markdown"):
        v2.check_reference("table parsing en", [html], "Read the table")


def test_chart_parsing_by_hand():
    gold = '{"title": "Sales", "2020": 12}'
    assert teds.dict_to_html({"2020": 12}) == \
        "<html><body><table>\n  <tr><td>2020</td><td>1 2</td></tr>\n</table></body></html>"
    assert teds.chart_parsing_score("{'title': 'Sales', '2020': 12}", gold) == 1.0
    # values "1 3" vs "1 2": 1 edit of 3 tokens, over 6 nodes (2 tr + 4 td)
    prediction = "```python\nchart = {'title': 'Sales',  # the title\n '2020': 13}\n```"
    assert teds.chart_parsing_score(prediction, gold) == pytest.approx(1 - (1 / 3) / 6)
    for junk in ("", "no dict", "[1, 2]", "{'a': "):
        assert teds.chart_parsing_score(junk, gold) == 0.0
    assert v2.score_item("chart parsing en", "{'title': 'Sales', '2020': 12}", [gold]) == 1.0
    with pytest.raises(ValueError, match="not a dict"):
        v2.check_reference("chart parsing en", ["[1, 2]"])


def test_document_parsing_steds_by_hand():
    gold = "# Title\nSome text"                # ROOT(TITLE, " Title"("Some text")): 4 nodes
    assert teds.steds(gold, gold) == 1.0
    assert teds.steds("# Title\nOther words", gold) == 1.0   # non-blank labels rename for free
    # no heading: ROOT(TITLE("Some text")), one insertion
    assert teds.steds("Some text", gold) == pytest.approx(0.75)
    # empty prediction: ROOT(TITLE("")); the blank node renamed (1) plus one insertion
    assert teds.steds("", gold) == pytest.approx(0.5)
    # two blank lines match at cost 1: a perfect prediction with a blank line is 1 - 1/5
    assert teds.steds("# A\n\nx", "# A\n\nx") == pytest.approx(0.8)
    assert v2.score_item("document parsing cn", "# 标题\n正文", ["# 标题\n正文"]) == 1.0


# --------------------------------------------------------------------------- spotting

GOLD_BOXES = [[0, 0, 100, 0, 100, 100, 0, 100], [200, 200, 300, 200, 300, 300, 200, 300],
              [400, 400, 500, 400, 500, 500, 400, 500]]
GOLD_TEXTS = ["STOP", "EXIT", "###"]


def test_spotting_f_score_by_hand():
    prediction = ("[[0, 0, 100, 100, 'stop'], [200, 200, 290, 300, 'EXITS'], "
                  "[410, 410, 500, 500, 'junk'], [600, 600, 700, 700, 'x']]")
    # stop ~ STOP (IoU 1, case ignored); EXITS matched to EXIT (IoU 0.9) but wrong; the third
    # lies in the don't-care box and is dropped; the fourth matches nothing.
    # R = 1 / 2 care references, P = 1 / 3 care detections -> F = 2 (1/6) / (5/6)
    assert spotting.spotting_score(prediction, GOLD_BOXES, GOLD_TEXTS) == pytest.approx(0.4)
    perfect = "(0, 0, 100, 100, STOP) (200, 200, 300, 300, EXIT)"        # read by the regex
    assert spotting.spotting_score(perfect, GOLD_BOXES, GOLD_TEXTS) == 1.0
    # IoU exactly 0.5 is not a match
    assert spotting.spotting_score("[[0, 0, 100, 50, 'STOP']]", GOLD_BOXES[:1], ["STOP"]) == 0.0


def test_spotting_transcriptions_and_junk():
    assert spotting.transcription_match("(EXIT)", "EXIT") and spotting.transcription_match("EXIT.", "EXIT")
    assert not spotting.transcription_match("EX-IT", "EXIT") and not spotting.transcription_match("", "A")
    assert spotting.spotting_boxes("[[1, 2, 3, 4, 'a'], [1, 2, 3, 4, 'a'], [1, 2, 3]]") == [((1, 2, 3, 4), "a")]
    for junk in ("", "nothing", "[[0, 0, 2000, 10, 'x']]", "[[1, 2, 3]]", "[[5, 5, 1, 1, 'x']]",
                 "{'a': 1}", "[[0, 0, 1.5, 10, 'x']]"):
        assert spotting.spotting_score(junk, GOLD_BOXES, GOLD_TEXTS) == 0.0, junk
    item = types.SimpleNamespace(answer=GOLD_TEXTS, question="Spot the text.",
                                 meta={"type": "text spotting en", "eval": "",
                                       "bbox_list": GOLD_BOXES, "content": GOLD_TEXTS})
    completion = "<answer>[[0, 0, 100, 100, 'STOP'], [200, 200, 300, 300, 'EXIT']]</answer>"
    assert scoring.score("ocrbench_v2", completion, item) == 1.0
    with pytest.raises(ValueError, match="as many bbox_list boxes"):
        v2.check_reference("text spotting en", [], boxes=GOLD_BOXES, contents=["a"])


# --------------------------------------------------------------------------- tree edit distance


def random_tree(rng, size):
    nodes = [zss.Node(rng.choice("abc"))]
    for _ in range(size - 1):
        child = zss.Node(rng.choice("abc"))
        rng.choice(nodes).addkid(child)
        nodes.append(child)
    return nodes[0]


def bracket(node):
    return "{" + node.label + "".join(bracket(c) for c in node.children) + "}"


def test_tree_edit_distance_equals_zss_and_apted_on_random_trees():
    rng = random.Random(0)
    for _ in range(150):
        a, b = random_tree(rng, rng.randint(1, 9)), random_tree(rng, rng.randint(1, 9))
        ours = tree_edit_distance(a, b, lambda n: n.children, lambda x, y: float(x.label != y.label))
        assert ours == zss.simple_distance(a, b)
        assert ours == apted.APTED(Tree.from_text(bracket(a)), Tree.from_text(bracket(b))).compute_edit_distance()


# --------------------------------------------------------------------------- aggregation


def test_aggregate_over_all_30_types_has_no_missing_type():
    records = [{"score": 0.5, "meta": {"type": task}} for task in sorted(v2.CATEGORIES)]
    records[0]["meta"]["meteor"] = text.meteor_form()
    metrics = v2.aggregate(records)
    assert metrics["missing_types"] == [] and not v2.UNSCORED_TYPES
    assert v2.SCORED_TYPES == set(v2.CATEGORIES)
    assert len(metrics["categories"]["en"]) == 8 and len(metrics["categories"]["cn"]) == 5
    assert metrics["overall"] == {"en": 0.5, "cn": 0.5} and metrics["score"] == 0.5
    assert metrics["meteor"] == text.meteor_form()
    assert "meteor" not in v2.aggregate(records[1:])
