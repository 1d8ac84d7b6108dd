"""Reliability, inputs: every input fault of the reliability issue, tried in one place.

Faults and their references:
- images (corrupt, empty, tiny, huge beyond max_pixels, extreme aspect ratios, grayscale /
  RGBA / palette / 16-bit / float PIL modes, non-uint8 arrays): processor.preprocess_image
  against transformers' Qwen2VLImageProcessorPil, pixel-identical, or a ValueError exactly
  where the reference refuses too (or, for arrays that are not uint8, one naming uint8);
- encoded image bytes (random, truncated, bit-flipped, huge headers): records.decode_image
  raises BadRecord and nothing else;
- records in the replay path (undecodable/empty/extreme images, empty questions, control
  tokens in text, over-long prompts): skipped and counted, or truncated and counted with
  ReplayConfig.prompt_overflow="truncate" (checked against the processor's own encoding of
  the truncated prompt);
- image-token counts that disagree with image_grid_thw: InputError naming both counts;
- rewards on generated junk: a float in [0, 1], never an exception, in bounded time.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time

import numpy as np
import PIL.Image
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image

from recap_jax import rewards
from recap_jax.data import encode, records, synthetic, tasks
from recap_jax.data.records import BadRecord, Record, SkipCounter
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl import processor as proc

DEFAULT_MIN, DEFAULT_MAX = 3136, 12845056
SMALL_MAX = 28 * 28 * 16  # a configured limit that images of a few hundred pixels exceed
VOCAB = 400
SMALL = (56, 56)


# ============================================================================ images


def reference(image, min_pixels, max_pixels, **kwargs):
    out = hf_image.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(
        images=[image], return_tensors="np", **kwargs)
    return out["pixel_values"], out["image_grid_thw"][0]


PIL_MODES = ("RGB", "L", "RGBA", "LA", "P", "1", "CMYK", "I", "I;16", "F")
ARRAY_KINDS = ("hw", "hw1", "hw3", "hw4")


def make_image(kind: str, height: int, width: int, seed: int):
    """(our input, the reference's input and its kwargs) of one image kind."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if kind == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        return image, image, {}
    if kind == "F":
        image = PIL.Image.fromarray(rng.normal(100, 80, (height, width)).astype(np.float32))
        return image, image, {}
    if kind in PIL_MODES:
        image = PIL.Image.fromarray(rgba, "RGBA").convert(kind)
        return image, image, {}
    if kind == "hw":  # (H, W) means grayscale, as PIL mode "L" does
        return rgba[..., 0], PIL.Image.fromarray(rgba[..., 0]), {}
    channels = {"hw1": 1, "hw3": 3, "hw4": 4}[kind]
    array = np.ascontiguousarray(rgba[..., :channels])
    return array, array, {"input_data_format": "channels_last"}


image_sizes = st.one_of(
    st.tuples(st.integers(1, 8), st.integers(1, 8)),  # tiny: scaled up to min_pixels
    st.tuples(st.integers(1, 420), st.integers(1, 420)),  # up to 14x beyond SMALL_MAX
    st.integers(1, 2).flatmap(  # aspect ratios around the limit of 200, both ways
        lambda side: st.tuples(st.just(side), st.integers(190 * side, 215 * side))),
).flatmap(lambda hw: st.sampled_from([hw, hw[::-1]]))


@settings(max_examples=150)  # cheap examples: more of them
@given(size=image_sizes, kind=st.sampled_from(PIL_MODES + ARRAY_KINDS),
       limits=st.sampled_from([(DEFAULT_MIN, DEFAULT_MAX), (DEFAULT_MIN, SMALL_MAX)]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_preprocess_image_is_the_reference_or_a_value_error(size, kind, limits, seed):
    ours_input, ref_input, ref_kwargs = make_image(kind, *size, seed)
    min_pixels, max_pixels = limits
    try:
        ref_pixels, ref_grid = reference(ref_input, min_pixels, max_pixels, **ref_kwargs)
    except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
            proc.preprocess_image(ours_input, min_pixels=min_pixels, max_pixels=max_pixels)
        return
    pixels, grid = proc.preprocess_image(ours_input, min_pixels=min_pixels, max_pixels=max_pixels)
    np.testing.assert_array_equal(grid, ref_grid)
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    np.testing.assert_array_equal(pixels, ref_pixels)


@given(dtype=st.sampled_from([np.uint16, np.int8, np.int64, np.float16, np.float32,
                              np.float64, np.bool_]),
       shape=st.sampled_from([(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)]))
def test_arrays_that_are_not_uint8_are_refused_by_name(dtype, shape):
    with pytest.raises(ValueError, match=f"uint8.*{np.dtype(dtype)}"):
        proc.preprocess_image(np.ones(shape, dtype))


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((0, 5, 3), np.uint8), ValueError, "empty side"),
    (np.zeros((5, 0), np.uint8), ValueError, "empty side"),
    (np.zeros((5, 5, 2), np.uint8), ValueError, "channels-last"),
    (np.zeros((2, 5, 5, 3), np.uint8), ValueError, "channels-last"),
    (PIL.Image.new("RGB", (0, 4)), ValueError, "positive integer"),
    (None, TypeError, "NoneType"),
    ([[1, 2], [3, 4]], TypeError, "list"),
])
def test_unusable_images_raise_a_clear_error(image, error, message):
    with pytest.raises(error, match=message):
        proc.preprocess_image(image)


def test_image_beyond_the_default_max_pixels_is_resized_as_the_reference():
    small = np.random.default_rng(0).integers(0, 256, (37, 36, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(small).resize((3600, 3700), PIL.Image.Resampling.NEAREST)
    assert image.width * image.height > DEFAULT_MAX
    pixels, grid = proc.preprocess_image(image)
    ref_pixels, ref_grid = reference(image, DEFAULT_MIN, DEFAULT_MAX)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(pixels, ref_pixels)
    assert int(grid.prod()) * 14 * 14 <= DEFAULT_MAX


# ============================================================================ image bytes


ORIGINAL = np.random.default_rng(1).integers(0, 256, (23, 17, 3), dtype=np.uint8)
LOSSLESS = ("PNG", "BMP", "TIFF", "PPM")


def encoded(fmt: str) -> bytes | None:
    buffer = io.BytesIO()
    try:
        PIL.Image.fromarray(ORIGINAL).save(buffer, format=fmt)
    except (KeyError, OSError):  # format not compiled into this Pillow
        return None
    return buffer.getvalue()


ENCODINGS = {fmt: data for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO")
             if (data := encoded(fmt)) is not None}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC), with no image data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def decode_or_bad_record(data: bytes):
    """decode_image's result, or None for a BadRecord; any other exception fails the test."""
    start = time.monotonic()
    try:
        image = records.decode_image(data, what="image of f.jsonl:3")
    except BadRecord as error:
        assert error.kind == "image" and "image of f.jsonl:3" in str(error)
        image = None
    assert time.monotonic() - start < 10
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) > 0
    return image


def test_valid_encodings_decode_to_the_original():
    assert {"PNG", "JPEG", "GIF", "BMP"} <= set(ENCODINGS)
    for fmt in LOSSLESS:
        if fmt in ENCODINGS:
            np.testing.assert_array_equal(decode_or_bad_record(ENCODINGS[fmt]), ORIGINAL)


@settings(max_examples=200)  # cheap examples: more of them
@given(st.binary(max_size=600))
def test_random_bytes_are_a_bad_record(data):
    decode_or_bad_record(data)


@settings(max_examples=150)  # cheap examples: more of them
@given(fmt=st.sampled_from(sorted(ENCODINGS)), fraction=st.floats(0, 0.98))
def test_truncated_images_are_a_bad_record_unless_all_pixels_remain(fmt, fraction):
    data = ENCODINGS[fmt]
    image = decode_or_bad_record(data[: int(len(data) * fraction)])
    if image is not None:  # only a trailer was cut (e.g. PNG's IEND): every pixel is there
        np.testing.assert_array_equal(image, records.decode_image(data))


@settings(max_examples=150)  # cheap examples: more of them
@given(fmt=st.sampled_from(sorted(ENCODINGS)), data=st.data())
def test_bit_flipped_images_decode_or_are_a_bad_record(fmt, data):
    payload = bytearray(ENCODINGS[fmt])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(payload) - 1), st.integers(1, 255)),
                               min_size=1, max_size=8))
    for position, mask in flips:
        payload[position] ^= mask
    decode_or_bad_record(bytes(payload))


@pytest.mark.parametrize("data, message", [
    (b"", "empty image bytes"),
    (png_header(9000, 8000), "9000x8000 out of range"),  # above MAX_IMAGE_PIXELS
    (png_header(100_000, 100_000), "DecompressionBombError"),  # PIL's own limit comes first
    (b"not an image at all", "cannot decode image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode image"),
])
def test_named_image_byte_faults(data, message):
    with pytest.raises(BadRecord, match=message) as error:
        records.decode_image(data, what="image of f.jsonl:3")
    assert error.value.kind == "image"


# ============================================================================ records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = []
    for task in synthetic.SYNTHETIC_TASKS:
        for record in synthetic.generate(task, "train", 40):
            corpus.append(tasks.get_task(task).format_prompt(record.question) + " "
                          + record.answer_text)
    return proc.build_demo_tokenizer(corpus * 3, VOCAB, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return proc.Qwen2_5_VLProcessor(tokenizer)


@pytest.fixture(scope="module")
def model_config():
    return config_lib.tiny(VOCAB)


def reasoning_record(index=3, **changes) -> Record:
    record = synthetic.make_record("reasoning", "train", index, image_size=SMALL)
    return dataclasses.replace(record, **changes)


def chat_prompt(processor, task, question):
    return processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": task.format_prompt(question)}]}])


def generation_prompt_ids(processor):
    return processor.tokenizer("<|im_start|>assistant\n")["input_ids"]


def assert_well_formed(example, processor, model_config, max_tokens):
    """Invariants of an encoded prompt that truncation must keep."""
    ids, grid = example["input_ids"], example["image_grid_thw"]
    assert len(ids) <= max_tokens
    assert int(np.sum(ids == model_config.image_token_id)) == int(np.prod(grid)) // 4
    assert int(np.sum(ids == model_config.vision_start_token_id)) == 1
    assert int(np.sum(ids == model_config.vision_end_token_id)) == 1
    tail = generation_prompt_ids(processor)
    assert list(ids[-len(tail):]) == tail
    assert example["position_ids"].shape == (3, len(ids))


BAD_IMAGES = {
    "empty": np.zeros((0, 4, 3), np.uint8),
    "float": np.zeros((30, 30, 3), np.float32),
    "two channels": np.zeros((30, 30, 2), np.uint8),
    "aspect 300": np.zeros((1, 300, 3), np.uint8),
    "not an array": "no-such-file.png",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_unusable_record_images_are_bad_records(processor, model_config, name):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256,
                                   max_answer_tokens=64)
    with pytest.raises(BadRecord, match="image: cannot preprocess") as error:
        encoder.encode(tasks.get_task("reasoning"), reasoning_record(image=BAD_IMAGES[name]))
    assert error.value.kind == "image"


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1400, 1100)])
def test_tiny_and_huge_record_images_encode_as_the_processor_does(tokenizer, model_config,
                                                                  size):
    processor = proc.Qwen2_5_VLProcessor(tokenizer, max_pixels=SMALL_MAX)
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    record = reasoning_record(image=image)
    task = tasks.get_task("reasoning")
    example = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256,
                                   max_answer_tokens=64).encode(task, record)
    expected = processor([chat_prompt(processor, task, record.question)], [[image]])
    np.testing.assert_array_equal(example["input_ids"], expected["input_ids"][0])
    np.testing.assert_array_equal(example["pixel_values"], expected["pixel_values"])
    ref_pixels, ref_grid = reference(image, DEFAULT_MIN, SMALL_MAX,
                                     input_data_format="channels_last")
    np.testing.assert_array_equal(example["pixel_values"], ref_pixels)
    np.testing.assert_array_equal(example["image_grid_thw"], ref_grid)
    assert tuple(example["image_size"]) == size


@pytest.mark.parametrize("changes, message, kind", [
    ({"question": ""}, "question is empty", "text"),
    ({"question": " \n\t "}, "question is empty", "text"),
    ({"question": None}, "question is a NoneType", "text"),
    ({"answer": "  "}, "answer is empty", "text"),
    ({"answer": ("x", 1, 2, 3)}, "malformed answer", "box"),
    ({"answer": None}, "malformed answer", "box"),
    ({"question": "how many <|image_pad|> are there?"}, r"question contains .*image_pad", "text"),
    ({"question": "hi<|im_end|>\n<|im_start|>assistant\n"}, r"question contains .*im_end",
     "text"),
    ({"answer": "5<|endoftext|>"}, r"answer contains .*endoftext", "text"),
])
def test_empty_text_and_control_tokens_are_bad_records(processor, model_config, changes,
                                                       message, kind):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256,
                                   max_answer_tokens=64)
    with pytest.raises(BadRecord, match=message) as error:
        encoder.encode(tasks.get_task("reasoning"), reasoning_record(**changes))
    assert error.value.kind == kind


LONG_QUESTION = "How many circles are in the image? " + " ".join(
    f"then count the {word} shapes" for word in ("red", "blue", "green", "small", "big") * 12)


def test_over_long_prompt_is_skipped_by_default(processor, model_config):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=128,
                                   max_answer_tokens=64)
    with pytest.raises(BadRecord, match=r"text: prompt has \d+ tokens \(max 128\)"):
        encoder.encode(tasks.get_task("reasoning"), reasoning_record(question=LONG_QUESTION))


def assert_truncated_prompt(example, processor, model_config, task, record, limit):
    """The example is the processor's own encoding of the chat with a prefix of the question
    (then the task suffix), fits ``limit`` and keeps the template and image tokens whole."""
    assert_well_formed(example, processor, model_config, limit)
    text = processor.tokenizer.decode(example["input_ids"])
    body = text.split("<|vision_end|>")[1].split("<|im_end|>")[0]
    suffix = task.prompt_template.replace("{question}", "")
    assert body.endswith(suffix)
    kept = body[: len(body) - len(suffix)]
    question = record.question.strip()
    assert kept.strip() and question.startswith(kept) and len(kept) < len(question)
    expected = processor([chat_prompt(processor, task, kept)], [[record.image]])
    np.testing.assert_array_equal(example["input_ids"], expected["input_ids"][0])
    return kept


@pytest.mark.parametrize("task_name", ["reasoning", "ocr"])
def test_over_long_prompt_is_truncated_when_configured(processor, model_config, task_name):
    limit = 128
    task = tasks.get_task(task_name)
    record = reasoning_record(question=LONG_QUESTION)
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=limit,
                                   max_answer_tokens=64, prompt_overflow="truncate")
    notes = []
    example = encoder.encode(task, record, note=lambda kind, message: notes.append(kind))
    assert notes == ["truncated"]
    kept = assert_truncated_prompt(example, processor, model_config, task, record, limit)
    assert len(kept) > 20
    assert len(example["input_ids"]) >= limit - 3  # only what had to go was dropped
    # A prompt that fits is left alone and not noted.
    notes.clear()
    short = encoder.encode(task, reasoning_record())
    plain = encode.RecordEncoder(processor, model_config, max_prompt_tokens=limit,
                                 max_answer_tokens=64).encode(task, reasoning_record())
    np.testing.assert_array_equal(short["input_ids"], plain["input_ids"])
    assert notes == []


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789?.,", min_size=1, max_size=9)


@settings(max_examples=60)
@given(question=st.lists(words, min_size=1, max_size=12).map(" ".join).flatmap(
           lambda phrase: st.integers(8, 80).map(lambda n: " ".join([phrase] * n))),
       limit=st.sampled_from([100, 128, 200]), task_name=st.sampled_from(["reasoning", "ocr"]))
def test_truncation_keeps_a_question_prefix_and_fills_the_limit(processor, model_config,
                                                                question, limit, task_name):
    task, record = tasks.get_task(task_name), reasoning_record(question=question)
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=limit,
                                   max_answer_tokens=64, prompt_overflow="truncate")
    plain = encode.RecordEncoder(processor, model_config, max_prompt_tokens=10 ** 6,
                                 max_answer_tokens=64).encode(task, record)
    notes = []
    example = encoder.encode(task, record, note=lambda kind, message: notes.append(kind))
    if len(plain["input_ids"]) <= limit:
        np.testing.assert_array_equal(example["input_ids"], plain["input_ids"])
        assert notes == []
        return
    assert notes == ["truncated"]
    assert_truncated_prompt(example, processor, model_config, task, record, limit)
    assert len(example["input_ids"]) >= limit - 3


def test_truncation_that_cannot_fit_is_a_bad_record(processor, model_config):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=40,
                                   max_answer_tokens=64, prompt_overflow="truncate")
    with pytest.raises(BadRecord, match="does not fit even with its question cut"):
        encoder.encode(tasks.get_task("reasoning"), reasoning_record(question=LONG_QUESTION))


def test_prompt_overflow_is_validated(processor, model_config):
    from recap_jax.data import replay

    with pytest.raises(ValueError, match=r"prompt_overflow 'cut' unknown; one of \('skip', "
                                         r"'truncate'\)"):
        replay.ReplayConfig(prompt_overflow="cut")
    with pytest.raises(ValueError, match="prompt_overflow must be one of"):
        encode.RecordEncoder(processor, model_config, max_prompt_tokens=64,
                             max_answer_tokens=8, prompt_overflow="drop")


WORDS = ["count", " the", " shapes", "<think>", "</answer>", "日本", "\n", " ", "{question}",
         "é"]
question_text = st.one_of(
    st.text(max_size=300),
    st.builds(lambda piece, count: piece * count, st.text(min_size=1, max_size=12),
              st.sampled_from([1, 10, 40, 200])),  # long: truncated or skipped
    st.lists(st.sampled_from(WORDS), max_size=300).map("".join),
    st.lists(st.sampled_from(WORDS + ["<|image_pad|>", "<|im_end|>", "<|vision_start|>"]),
             max_size=50).map("".join),
)


@settings(max_examples=150)  # cheap examples: more of them
@given(question=question_text, overflow=st.sampled_from(encode.PROMPT_OVERFLOWS),
       limit=st.sampled_from([90, 128, 200]))
def test_fuzzed_questions_encode_well_formed_or_are_bad_records(processor, model_config,
                                                                question, overflow, limit):
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=limit,
                                   max_answer_tokens=64, prompt_overflow=overflow)
    try:
        example = encoder.encode(tasks.get_task("reasoning"), reasoning_record(question=question))
    except BadRecord as error:
        assert error.kind == "text"
        return
    assert question.strip() and "<|" not in question
    assert_well_formed(example, processor, model_config, limit)


class BrokenRecords:
    """A synthetic source whose listed entries are broken the way real data breaks."""

    def __init__(self, base, broken):
        self.base, self.broken, self.name = base, broken, base.name

    def __len__(self):
        return len(self.base)

    @property
    def blocks(self):
        return self.base.blocks

    def where(self, i):
        return self.base.where(i)

    def load(self, i):
        record = self.base.load(i)
        fault = self.broken.get(i)
        if fault == "corrupt bytes":  # a source decoding its stored bytes
            records.decode_image(b"\x89PNG\r\n\x1a\n garbage", what=f"image of entry {i}")
        if fault == "empty image":
            return dataclasses.replace(record, image=np.zeros((0, 4, 3), np.uint8))
        if fault == "aspect 300":
            return dataclasses.replace(record, image=np.zeros((1, 300, 3), np.uint8))
        if fault == "empty question":
            return dataclasses.replace(record, question="  ")
        if fault == "long question":
            return dataclasses.replace(record, question=LONG_QUESTION)
        return record


BROKEN = {1: "corrupt bytes", 2: "empty image", 3: "aspect 300", 4: "empty question",
          5: "long question"}


@pytest.mark.parametrize("overflow", ["skip", "truncate"])
def test_replay_skips_and_counts_broken_records(processor, model_config, caplog, overflow):
    pytest.importorskip("tensorflow")
    from recap_jax.data import replay

    base = synthetic.SyntheticSource("reasoning", size=8, image_size=SMALL)
    source = BrokenRecords(base, BROKEN)
    skips = SkipCounter()
    config = replay.ReplayConfig(batch_size=2, prompt_buckets=(128,), chunk_size=4,
                                 prompt_overflow=overflow)
    with caplog.at_level(logging.WARNING):
        with replay.make_replay([source], processor, model_config, config,
                                skips=skips) as iterator:
            batches = [next(iterator) for _ in range(8)]  # 16 examples: several epochs
    good = {0, 6, 7} | ({5} if overflow == "truncate" else set())
    ids = {record_id for batch in batches for record_id in batch["id"]}
    assert ids == {base.load(i).id for i in good}
    assert skips.count("reasoning") == 5 - (overflow == "truncate")
    expected_reasons = {"image": 3, "text": 2 - (overflow == "truncate")}
    assert skips.reasons("reasoning") == expected_reasons
    assert max(batch["attention_mask"].sum(1).max() for batch in batches) <= 128
    truncated = [r for r in caplog.records if r.getMessage().startswith("record of source")]
    if overflow == "truncate":
        assert skips.notes("reasoning") == {"truncated": 1}
        assert len(truncated) == 1 and "synthetic:reasoning/train/seed0, index 5" in (
            truncated[0].getMessage())
    else:
        assert skips.notes("reasoning") == {} and not truncated


def test_processor_call_refuses_an_empty_prompt(processor):
    with pytest.raises(ValueError, match="sample 1: empty prompt"):
        processor(["hello", ""])


# ============================================================================ model inputs


def image_prompt(config, grids, counts, text):
    """ids [1, n]: text tokens, then per image <vision_start>, counts[k] image tokens, <end>."""
    row = [7] * text
    for count in counts:
        row += [config.vision_start_token_id] + [config.image_token_id] * count
        row += [config.vision_end_token_id]
    return np.asarray([row + [8]])


grid_lists = st.lists(st.tuples(st.just(1), st.integers(1, 4).map(lambda n: 2 * n),
                                st.integers(1, 4).map(lambda n: 2 * n)), min_size=1, max_size=3)


@given(grids=grid_lists, delta=st.integers(-3, 3), text=st.integers(0, 6))
def test_image_token_count_disagreeing_with_the_grid_names_both_counts(grids, delta, text):
    config = config_lib.tiny(VOCAB)
    counts = [t * h * w // 4 for t, h, w in grids]
    assume(counts[0] + delta >= 0)
    expected = sum(counts)
    ids = image_prompt(config, grids, [counts[0] + delta, *counts[1:]], text)
    pixels = np.zeros((sum(t * h * w for t, h, w in grids), config.vision.patch_dim), np.float32)
    if delta == 0:
        inputs = model_lib.prepare_inputs(config, ids, pixel_values=pixels, image_grid_thw=grids)
        assert sorted(inputs.feature_index[inputs.feature_index >= 0]) == list(range(expected))
        return
    with pytest.raises(model_lib.InputError) as error:
        model_lib.prepare_inputs(config, ids, pixel_values=pixels, image_grid_thw=grids)
    message = str(error.value)
    assert f"hold {expected + delta} image tokens" in message
    assert f"describes {expected} merged patches" in message


@given(grids=grid_lists.filter(lambda g: len(g) >= 2), moved=st.integers(1, 2))
def test_image_tokens_split_unlike_the_grid_rows_are_named_per_image(grids, moved):
    """The total agrees but image 0 took tokens of image 1: named per image."""
    config = config_lib.tiny(VOCAB)
    counts = [t * h * w // 4 for t, h, w in grids]
    assume(counts[1] >= moved)
    ids = image_prompt(config, grids, [counts[0] + moved, counts[1] - moved, *counts[2:]], 2)
    pixels = np.zeros((sum(t * h * w for t, h, w in grids), config.vision.patch_dim), np.float32)
    with pytest.raises(ValueError, match=f"image 0 has {counts[0] + moved} placeholder tokens .* "
                                         f"needs {counts[0]}"):
        model_lib.prepare_inputs(config, ids, pixel_values=pixels, image_grid_thw=grids)


# ============================================================================ rewards

MATH_BOMBS = ["10^10^10", "2**99999999", "9^{9^{9}}", "(10^100)!", "\\frac{1}{0}", "1e999999999",
              "factorial(99999)", "2^{2^{2^{2^{2}}}}", "nan", "inf", "-inf", "1e309", "0/0",
              "\\sqrt{-1}", "x^" + "9" * 30, "(" * 300 + "1" + ")" * 300, "1" * 500]
BOX_PARTS = ["nan", "inf", "-inf", "1e309", "-0", "1" * 40, "3.", "", " ", "0x1F", "1e-400",
             "12", "-5", "7.25", "[", "]", "None"]

fragment = st.one_of(st.text(max_size=20), st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "\n", " "]))
nested_tags = st.recursive(
    fragment,
    lambda inner: st.one_of(
        st.builds(lambda tag, body: f"<{tag}>{body}</{tag}>",
                  st.sampled_from(["think", "answer"]), inner),
        st.builds(lambda a, b: a + b, inner, inner)),
    max_leaves=25)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.integers(-10 ** 40, 10 ** 40).map(str), st.sampled_from(MATH_BOMBS))
malformed_boxes = st.lists(st.one_of(st.sampled_from(BOX_PARTS), numbers), max_size=6).map(
    lambda parts: "[" + ", ".join(parts) + "]")
junk = st.one_of(
    st.text(max_size=300),
    nested_tags,
    st.builds(lambda n, body, m: "<answer>" * n + body + "</answer>" * m,
              st.integers(0, 5000), st.text(max_size=30), st.integers(0, 5000)),
    st.builds(lambda piece, count: piece * count, fragment.filter(bool),
              st.sampled_from([1000, 50_000, 400_000])),  # up to megabytes
    numbers.map(lambda n: f"<think>x</think><answer>{n}</answer>"),
    malformed_boxes.map(lambda box: f"<think>x</think><answer>{box}</answer>"),
)
junk_references = st.one_of(
    junk, st.none(), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10 ** 30, 10 ** 30), malformed_boxes,
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
    st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 4),
    st.just(("a", "b", "c", "d")), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
junk_sizes = st.one_of(st.none(), st.tuples(st.floats(allow_nan=True), st.floats()),
                       st.tuples(st.integers(-5, 5), st.integers(-5, 5)), st.text(max_size=3))
junk_context = st.fixed_dictionaries({}, optional={"image_size": junk_sizes,
                                                   "input_size": junk_sizes})
# Per call: the symbolic time limit plus generous slack for a loaded 2-core machine.
REWARD_TIME_BOUND_S = rewards.SYMBOLIC_TIME_LIMIT_S + 8


def assert_valid_reward(name, completion, reference, context):
    start = time.monotonic()
    value = rewards.REWARDS[name](completion, reference, **context)
    elapsed = time.monotonic() - start
    assert type(value) is float and math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)
    assert elapsed < REWARD_TIME_BOUND_S, (name, elapsed, completion[:200])


@settings(max_examples=150)  # cheap examples: more of them
@given(completion=junk, reference=junk_references, context=junk_context)
def test_every_reward_on_junk_is_a_float_in_unit_interval(completion, reference, context):
    for name in rewards.REWARDS:
        assert_valid_reward(name, completion, reference, context)


@pytest.mark.parametrize("bomb", MATH_BOMBS)
def test_math_bombs_in_answer_and_reference_are_bounded(bomb):
    for name in rewards.REWARDS:
        assert_valid_reward(name, f"<think>x</think><answer>{bomb}</answer>", bomb, {})
        assert_valid_reward(name, bomb, "3", {})


def test_rewards_still_score_real_answers_after_junk():
    """The junk above must not leave state behind (timers, caches) that breaks scoring."""
    assert rewards.accuracy("<think>a</think><answer>\\frac{1}{2}</answer>", "0.5") == 1.0
    assert rewards.iou("<answer>[0, 0, 10, 10]</answer>", (0, 0, 10, 10)) == 1.0
    assert rewards.format_think("<think>a</think><answer>b</answer>") == 1.0
    over_limit = "<answer>1</answer>" * (rewards.MAX_COMPLETION_CHARS // 17 + 1)
    assert all(fn(over_limit, "1") == 0.0 for fn in rewards.REWARDS.values())
