"""Replay buffer: determinism, exact resume from a saved state, mixing proportions, bad
records counted (not fatal), start-up failures, and the batch layout against the processor
and get_rope_index applied directly."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow")

from recap_jax.data import replay, sources, synthetic, tasks  # noqa: E402
from recap_jax.data.records import SkipCounter  # noqa: E402
from recap_jax.models.qwen2_5_vl import config as config_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import processor as processor_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import rope  # noqa: E402

VOCAB = 400
SMALL = (56, 56)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    corpus = []
    for task in synthetic.SYNTHETIC_TASKS:
        for record in synthetic.generate(task, "train", 40):
            corpus.append(tasks.get_task(task).format_prompt(record.question) + " "
                          + record.answer_text)
    tokenizer = processor_lib.build_demo_tokenizer(corpus * 3, VOCAB,
                                                   tmp_path_factory.mktemp("tokenizer"))
    return processor_lib.Qwen2_5_VLProcessor(tokenizer)


@pytest.fixture(scope="module")
def model_config():
    return config_lib.tiny(VOCAB)


def synthetic_sources(sizes=(("reasoning", 40), ("grounding", 20), ("ocr", 12))):
    return [synthetic.SyntheticSource(task, size=size, image_size=SMALL) for task, size in sizes]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


STRATEGY_CONFIGS = {
    "round_robin": replay.ReplayConfig(batch_size=3, strategy="round_robin", seed=1),
    "uniform": replay.ReplayConfig(batch_size=3, strategy="uniform", seed=1),
    "propmix": replay.ReplayConfig(batch_size=3, strategy="propmix", seed=2),
    "coreset": replay.ReplayConfig(batch_size=3, strategy="coreset", seed=3),
    "modomodo": replay.ReplayConfig(batch_size=3, strategy="modomodo", weights=(0.2, 0.5, 0.3)),
    "uniform_homogeneous": replay.ReplayConfig(batch_size=3, strategy="uniform",
                                               homogeneous=True, seed=4),
}


@pytest.mark.parametrize("name", sorted(STRATEGY_CONFIGS))
def test_stream_is_reproducible_and_resumes_exactly(processor, model_config, name):
    config = STRATEGY_CONFIGS[name]
    with replay.make_replay(synthetic_sources(), processor, model_config, config) as first:
        head = take(first, 4)
        state = json.loads(json.dumps(first.state()))  # survives JSON
        tail = take(first, 8)  # crosses the 12-example OCR epoch for several strategies
    with replay.make_replay(synthetic_sources(), processor, model_config, config) as again:
        assert_same_batches(take(again, 12), head + tail)
    with replay.make_replay(synthetic_sources(), processor, model_config, config,
                            state=state) as resumed:
        assert_same_batches(take(resumed, 8), tail)


def test_stale_state_is_refused(processor, model_config):
    config = STRATEGY_CONFIGS["uniform"]
    with replay.make_replay(synthetic_sources(), processor, model_config, config) as iterator:
        next(iterator)
        state = iterator.state()
    other = replay.ReplayConfig(batch_size=3, strategy="uniform", seed=99)
    with pytest.raises(ValueError, match="different configuration"):
        replay.make_replay(synthetic_sources(), processor, model_config, other, state=state)


def test_mixing_probabilities_by_hand():
    names, sizes = ["reasoning", "grounding", "ocr"], [100, 50, 30]
    config = lambda **kw: replay.ReplayConfig(**kw)  # noqa: E731
    assert replay.mixing_probabilities(config(strategy="round_robin"), names, sizes) is None
    np.testing.assert_allclose(
        replay.mixing_probabilities(config(strategy="uniform"), names, sizes), [1 / 3] * 3)
    np.testing.assert_allclose(
        replay.mixing_probabilities(config(strategy="propmix"), names, sizes),
        [100 / 180, 50 / 180, 30 / 180])
    # Coreset: replay capped at 0.5 * 100 = 50 of its 80, split 50:30 -> 31 and 19.
    coreset = config(strategy="coreset")
    lengths = replay.stream_sizes(coreset, names, sizes)
    assert lengths == [100, 31, 19]
    np.testing.assert_allclose(replay.mixing_probabilities(coreset, names, lengths),
                               [100 / 150, 31 / 150, 19 / 150])
    assert replay.stream_sizes(coreset, names, [100, 10, 5]) == [100, 10, 5]  # under the cap
    modomodo = replay.mixing_probabilities(config(strategy="modomodo"),
                                           ["lisa", "geoqav", "sat", "scienceqa"], [1, 1, 1, 1])
    np.testing.assert_allclose(modomodo, [0.3045, 0.2024, 0.2117, 0.2814])
    with pytest.raises(ValueError, match="no default share"):
        replay.mixing_probabilities(config(strategy="modomodo"), names, sizes)
    with pytest.raises(ValueError, match="strategy 'mixup' unknown"):
        replay.ReplayConfig(strategy="mixup")


@pytest.mark.parametrize("strategy, weights, expected", [
    ("uniform", None, [1 / 3, 1 / 3, 1 / 3]),
    ("propmix", None, [40 / 72, 20 / 72, 12 / 72]),
    ("modomodo", (0.6, 0.1, 0.3), [0.6, 0.1, 0.3]),
])
def test_mixing_proportions_over_many_batches(processor, model_config, strategy, weights,
                                              expected):
    config = replay.ReplayConfig(batch_size=16, strategy=strategy, weights=weights, seed=7)
    with replay.make_replay(synthetic_sources(), processor, model_config, config) as iterator:
        ids = np.concatenate([batch["source_id"] for batch in take(iterator, 60)])
    observed = np.bincount(ids, minlength=3) / len(ids)
    tolerance = 4 * np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / len(ids))
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)


def test_round_robin_batches_are_homogeneous_and_cycle(processor, model_config):
    with replay.make_replay(synthetic_sources(), processor, model_config,
                            STRATEGY_CONFIGS["round_robin"]) as iterator:
        batches = take(iterator, 7)
    for step, batch in enumerate(batches):
        assert set(batch["source_id"].tolist()) == {step % 3}
        assert {i.split("-")[0] for i in batch["id"]} == {["reasoning", "grounding", "ocr"][step % 3]}


def test_coreset_replays_a_fixed_subset(processor, model_config):
    sizes = (("reasoning", 8), ("grounding", 20), ("ocr", 12))  # budget 4: 3 + 1 (rounded 2.5, 1.5)
    config = replay.ReplayConfig(batch_size=8, strategy="coreset", seed=5)
    with replay.make_replay(synthetic_sources(sizes), processor, model_config, config) as iterator:
        batches = take(iterator, 20)
    seen = {}
    for batch in batches:
        for source_id, record_id in zip(batch["source_id"], batch["id"]):
            seen.setdefault(int(source_id), set()).add(record_id)
    lengths = replay.stream_sizes(config, ["reasoning", "grounding", "ocr"], [8, 20, 12])
    assert [len(seen[k]) for k in range(3)] == lengths
    assert sum(lengths[1:]) <= 0.5 * lengths[0]


def test_source_stream_permutes_each_epoch_and_keeps_blocks_together():
    class Blocky:
        name = "thinklite"
        blocks = np.repeat(np.arange(4), 5)

        def __len__(self):
            return 20

    stream = replay.SourceStream(Blocky(), seed=0)
    first, second = stream.order(0), stream.order(1)
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not np.array_equal(first, second)
    for order in (first, second):
        runs = order.reshape(4, 5) // 5  # consecutive rows of one block
        assert np.all(runs == runs[:, :1])
    assert [stream.index_at(p) for p in range(20, 25)] == list(second[:5])


def write_png(path, seed, size=(30, 40)):
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="PNG")


def refcoco_fixture(tmp_path, rows):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    with open(tmp_path / "rec.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return tmp_path / "rec.jsonl", root


def grounding_row(image, phrase="the dog"):
    return {"image": image, "normal_caption": phrase, "solution": [1, 1, 10, 10]}


@pytest.mark.parametrize("chunk_size", [1, 8])  # 1: chunks made only of bad records
def test_bad_records_are_skipped_and_counted_not_fatal(tmp_path, processor, model_config,
                                                       caplog, chunk_size):
    path, root = refcoco_fixture(tmp_path, [
        grounding_row("ok0.png"), grounding_row("missing.png"), grounding_row("ok1.png"),
        grounding_row("corrupt.png"), grounding_row("ok2.png"),
        grounding_row("ok3.png", phrase="the dog " * 200)])  # prompt too long for the buckets
    for i in range(4):
        write_png(root / f"ok{i}.png", i)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    skips = SkipCounter()
    source = sources.refcoco(path, image_root=root, skips=skips)
    config = replay.ReplayConfig(batch_size=2, strategy="round_robin", prompt_buckets=(128, 256),
                                 chunk_size=chunk_size)
    with caplog.at_level(logging.WARNING):
        with replay.make_replay([source], processor, model_config, config,
                                skips=skips) as iterator:
            batches = take(iterator, 9)  # 18 examples = 6 epochs of the 3 good records
    ids = {record_id for batch in batches for record_id in batch["id"]}
    assert ids == {f"{path}:{i}" for i in (0, 2, 4)}
    assert skips.count("refcoco") == 3
    assert skips.reasons("refcoco") == {"image": 2, "text": 1}
    logged = [r for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(logged) == 3 and all(str(path) in r.getMessage() for r in logged)


def test_a_source_with_nothing_usable_fails_at_start_up(tmp_path, processor, model_config):
    path, root = refcoco_fixture(tmp_path, [grounding_row("gone0.png"), grounding_row("gone1.png")])
    source = sources.refcoco(path, image_root=root)
    with pytest.raises(ValueError, match="'refcoco': none of the first 2 records is usable"):
        replay.make_replay([source], processor, model_config, replay.ReplayConfig(batch_size=1))


def test_batch_layout_matches_the_processor_and_rope_index(processor, model_config):
    config = replay.ReplayConfig(batch_size=4, strategy="uniform", seed=11)
    with replay.make_replay(synthetic_sources(), processor, model_config, config) as iterator:
        batch = next(iterator)
    records = []
    for record_id in batch["id"]:
        task, split, seed, index = record_id.split("-")
        records.append(synthetic.make_record(task, split, int(index), seed=int(seed),
                                             image_size=SMALL))
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": tasks.get_task(r.source).format_prompt(
            r.question)}]}]) for r in records]
    reference = processor(texts, [[r.image] for r in records], padding_side="left",
                          max_length=batch["input_ids"].shape[1])
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], reference["attention_mask"])
    positions, deltas = rope.get_rope_index(reference["input_ids"], reference["image_grid_thw"],
                                            None, None, reference["attention_mask"], model_config)
    np.testing.assert_array_equal(batch["position_ids"], positions.transpose(1, 0, 2))
    np.testing.assert_array_equal(batch["rope_deltas"], deltas[:, 0])
    pixels, grids = replay.encode_lib.flat_vision_inputs(batch)
    np.testing.assert_array_equal(pixels, reference["pixel_values"])
    np.testing.assert_array_equal(grids, reference["image_grid_thw"])
    assert batch["pixel_values"].shape[1] in config.patch_buckets
    assert batch["input_ids"].shape[1] in config.prompt_buckets
    for row, record in enumerate(records):
        assert batch["answer"][row] == record.answer_text
        assert batch["source_id"][row] == ["reasoning", "grounding", "ocr"].index(record.source)
        answer = batch["answer_ids"][row][batch["answer_mask"][row] == 1]
        assert processor.tokenizer.decode(answer) == record.answer_text + "<|im_end|>"
        assert tuple(batch["image_size"][row]) == record.image_size
        grid = reference["image_grid_thw"][row]
        assert tuple(batch["input_size"][row]) == (grid[1] * 14, grid[2] * 14)
