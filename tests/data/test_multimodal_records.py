"""Multi-image, text-only and video records through the data pipeline: a jsonl source with a
list of images per row (and an explicit ``"images": []`` row, a video row, a single-image
row) goes through open_sources → make_replay → rollout.prompt_inputs → the model, checked
against transformers' Qwen2_5_VLProcessor (built offline; its video processor is the
torchvision-free stand-in of tests/models/test_processor_multimodal) and transformers'
Qwen2_5_VLForConditionalGeneration on the same records.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

pytest.importorskip("tensorflow")

from recap_jax import plan, rollout  # noqa: E402
from recap_jax.data import encode, replay, run_sources, sources, tasks  # noqa: E402
from recap_jax.data.records import BadRecord, Record, SkipCounter, Video  # noqa: E402
from recap_jax.models import qwen2_5_vl as qwen  # noqa: E402
from recap_jax.models.qwen2_5_vl import config as config_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import processor as processor_lib  # noqa: E402
from recap_jax.models.qwen2_5_vl import rope  # noqa: E402
from tests.models.test_processor import CORPUS, HFProcessor, reference_processor  # noqa: E402
from tests.models.test_processor_multimodal import ReferenceVideoProcessor  # noqa: E402

VOCAB = 400
MIN_PIXELS, MAX_PIXELS = 3136, 60_000  # those of ReferenceVideoProcessor
PROMPT_BUCKETS = (128, 256)
LOGIT_ATOL = 2e-4
TASK = "scienceqa"


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tokenizer = processor_lib.build_demo_tokenizer(CORPUS, VOCAB, tmp_path_factory.mktemp("tok"))
    return processor_lib.Qwen2_5_VLProcessor(tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def model_config():
    return config_lib.tiny(VOCAB, text_layers=1, vision_depth=2, fullatt_block_indexes=(1,))


def write_png(path, seed, size):
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="PNG")
    return array


ROWS = [
    {"images": ["a.png", "b.png"], "question": "Which picture is brighter?", "answer": "A"},
    {"images": [], "question": "What is 2 + 3?", "answer": "5"},
    {"video": ["f0.png", "f1.png", "f2.png", "f3.png"], "fps": 2, "question": "What moves?",
     "answer": "the dot"},
    {"image": "c.png", "question": "What colour is it?", "answer": "red"},
]


@pytest.fixture(scope="module")
def jsonl_source(tmp_path_factory):
    """(file, image root, {name: array}) of a jsonl with the four kinds of rows of ROWS."""
    base = tmp_path_factory.mktemp("multimodal")
    root = base / "images"
    root.mkdir()
    arrays = {"a.png": write_png(root / "a.png", 0, (30, 40)),
              "b.png": write_png(root / "b.png", 1, (60, 90)),
              "c.png": write_png(root / "c.png", 2, (50, 50))}
    for k in range(4):
        arrays[f"f{k}.png"] = write_png(root / f"f{k}.png", 10 + k, (56, 56))
    path = base / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path, root, arrays


def opened(jsonl_source):
    path, root, _ = jsonl_source
    spec = plan.SourcePlan(name=TASK, kind=TASK, train=(str(path),), eval=(), image_root=str(root),
                           size=0, eval_size=0, max_records=0, layout="free")
    return run_sources.open_sources([spec], "train")[0]


def test_jsonl_rows_become_records_with_all_their_images_and_video(jsonl_source):
    _, _, arrays = jsonl_source
    source = opened(jsonl_source)
    two, text_only, video, one = (source.load(i) for i in range(4))
    assert len(two.images) == 2
    np.testing.assert_array_equal(two.image, arrays["a.png"])
    np.testing.assert_array_equal(two.more_images[0], arrays["b.png"])
    assert text_only.images == () and text_only.video is None and text_only.image_size == (0, 0)
    assert video.images == () and video.video.fps == 2.0 and video.image_size == (56, 56)
    np.testing.assert_array_equal(video.video.frames, np.stack([arrays[f"f{k}.png"] for k in range(4)]))
    assert len(one.images) == 1 and one.more_images == () and one.image_size == (50, 50)


def test_single_image_record_api_is_unchanged():
    image = np.zeros((8, 9, 3), np.uint8)
    record = Record("r", TASK, image, "q?", "a")
    assert record.images == (image,) and record.image_size == (8, 9) and record.video is None
    with pytest.raises(ValueError, match="more_images given without a first image"):
        Record("r", TASK, None, "q?", "a", more_images=(image,))
    with pytest.raises(BadRecord, match="fps must be a positive number"):
        Video(np.zeros((2, 4, 4, 3), np.uint8), fps=0)
    with pytest.raises(BadRecord, match=r"frames must be a uint8 array \[T, H, W, 3\]"):
        Video(np.zeros((4, 4, 3), np.uint8), fps=2)


def test_bad_multimodal_rows_are_skipped_and_counted(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    write_png(root / "x.png", 0, (20, 20))
    write_png(root / "y.png", 1, (30, 20))
    rows = [{"images": ["x.png", "x.png"], "normal_caption": "the dog", "solution": [1, 1, 5, 5]},  # box, 2 images
            {"image": "x.png", "normal_caption": "the dog", "solution": [1, 1, 5, 5]}]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skips = SkipCounter()
    grounding = sources.refcoco(tmp_path / "rec.jsonl", image_root=root, skips=skips)
    assert len(grounding) == 1 and skips.reasons("refcoco") == {"image": 1}
    rows = [{"video": ["x.png", "y.png"], "question": "q", "answer": "a"},  # frames differ in size
            {"video": ["x.png"], "fps": -1, "question": "q", "answer": "a"},
            {"question": "q", "answer": "a"},  # no image field at all: still a bad record
            {"images": [], "question": "q", "answer": "a"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = sources.scienceqa(tmp_path / "qa.jsonl", image_root=root, skips=skips)
    assert len(qa) == 2 and skips.reasons("scienceqa") == {"video": 1, "image": 1}
    with pytest.raises(BadRecord, match="frames of .* differ in size"):
        qa.load(0)


def reference_inputs(processor, texts, records):
    """transformers' processor output for ``records`` (left-padded, numpy)."""
    class OfflineProcessor(HFProcessor):  # the class check needs torchvision's video processor
        def check_argument_for_proper_class(self, name, arg):
            return None

    reference = OfflineProcessor(image_processor=reference_processor(MIN_PIXELS, MAX_PIXELS),
                                 tokenizer=processor.tokenizer, video_processor=ReferenceVideoProcessor())
    images = [image for r in records for image in r.images]
    videos = [r.video for r in records if r.video is not None]
    kwargs = {}
    if videos:
        kwargs = dict(videos=[v.frames for v in videos], video_metadata=[
            VideoMetadata(total_num_frames=len(v.frames), fps=v.fps, frames_indices=list(range(len(v.frames))))
            for v in videos])
    return reference(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="np",
                     **kwargs)


@pytest.fixture(scope="module")
def batch_and_records(jsonl_source, processor, model_config):
    source = opened(jsonl_source)
    config = replay.ReplayConfig(batch_size=4, strategy="round_robin", prompt_buckets=PROMPT_BUCKETS,
                                 patch_buckets=(64, 256), seed=3)
    with replay.make_replay([source], processor, model_config, config) as iterator:
        batch = next(iterator)
    by_id = {f"{path}:{index}": source.load(i) for i, (path, index) in enumerate(map(source.where, range(4)))}
    return batch, [by_id[record_id] for record_id in batch["id"]]


def test_replay_batch_equals_transformers_processor_and_rope(batch_and_records, processor, model_config):
    batch, records = batch_and_records
    assert sorted(len(r.images) + 10 * (r.video is not None) for r in records) == [0, 1, 2, 10]
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256, max_answer_tokens=64)
    texts = [encoder.prompt_text(tasks.get_task(TASK), r) for r in records]
    ref = reference_inputs(processor, texts, records)
    # Prompts: left-aligned in a bucket; the reference is left-padded to its longest row.
    length = ref["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] in PROMPT_BUCKETS
    np.testing.assert_array_equal(batch["input_ids"][:, -length:], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"][:, -length:], ref["attention_mask"])
    assert not batch["attention_mask"][:, :-length].any()
    # Vision inputs in transformers' concatenated form, rows in batch order.
    vision = encode.flat_vision_kwargs(batch)
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        np.testing.assert_array_equal(vision[grid], ref[grid])
        assert np.abs(vision[pixels] - ref[pixels]).max() <= 1e-5
    np.testing.assert_allclose(vision["second_per_grid_ts"], ref["second_per_grid_ts"], rtol=1e-7)
    assert batch["num_images"].tolist() == [len(r.images) for r in records]
    assert batch["num_videos"].tolist() == [int(r.video is not None) for r in records]
    # Patch bucket: the largest per-row total of image + video patches.
    totals = [sum(int(np.prod(g)) for g in batch["image_grids"][row][:batch["num_images"][row]])
              + sum(int(np.prod(g)) for g in batch["video_grid_thw"][row][:batch["num_videos"][row]])
              for row in range(4)]
    assert batch["num_patches"].tolist() == totals
    assert batch["pixel_values"].shape[1] == replay.encode_lib.bucket(max(totals), (64, 256), "patches")
    # M-RoPE: the batch's positions equal transformers' get_rope_index on its own inputs.
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**model_config.to_hf_dict())).eval()
    positions, deltas = hf.model.get_rope_index(
        torch.as_tensor(ref["input_ids"]), mm_token_type_ids=torch.as_tensor(ref["mm_token_type_ids"]),
        image_grid_thw=torch.as_tensor(ref["image_grid_thw"]), video_grid_thw=torch.as_tensor(ref["video_grid_thw"]),
        second_per_grid_ts=torch.as_tensor(ref["second_per_grid_ts"], dtype=torch.float32),
        attention_mask=torch.as_tensor(ref["attention_mask"]))
    np.testing.assert_array_equal(batch["position_ids"][:, :, -length:], positions.numpy().transpose(1, 0, 2))
    np.testing.assert_array_equal(batch["rope_deltas"], deltas.numpy()[:, 0])
    # The video row's grid: 4 frames / temporal patch 2, 56 px / 14; 2 / 2 fps = 1 s per patch.
    row = [r.video is not None for r in records].index(True)
    assert batch["video_grid_thw"][row, 0].tolist() == [2, 4, 4]
    assert batch["second_per_grid_ts"][row, 0] == 1.0


def test_encoder_single_image_example_is_as_before(processor, model_config):
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    record = Record("r", TASK, image, "What is it?", "a cat")
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256, max_answer_tokens=64)
    example = encoder.encode(tasks.get_task(TASK), record)
    out = processor([encoder.prompt_text(tasks.get_task(TASK), record)], [[image]])
    np.testing.assert_array_equal(example["input_ids"], out["input_ids"][0])
    np.testing.assert_array_equal(example["pixel_values"], out["pixel_values"])
    np.testing.assert_array_equal(example["image_grid_thw"], out["image_grid_thw"][0])
    np.testing.assert_array_equal(example["image_grids"], out["image_grid_thw"])
    assert example["video_grid_thw"].shape == (0, 3) and example["second_per_grid_ts"].shape == (0,)
    positions, _ = rope.get_rope_index(out["input_ids"], out["image_grid_thw"], None, None, None, model_config)
    np.testing.assert_array_equal(example["position_ids"], positions[:, 0])


def randomise_(model, seed):
    """Every weight random (norm scales around 1), so a wrong mapping cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.08 * noise)


def test_model_forward_on_the_replay_batch_matches_transformers(batch_and_records, processor, model_config,
                                                                tmp_path):
    batch, records = batch_and_records
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**model_config.to_hf_dict())).eval()
    randomise_(hf, seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = qwen.from_pretrained(tmp_path, dtype=jnp.float32)
    inputs = rollout.prompt_inputs(model_config, batch, PROMPT_BUCKETS)
    assert inputs.pixel_values is not None and inputs.vision is not None
    got, _ = ours.forward(jax.tree.map(jnp.asarray, inputs))
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256, max_answer_tokens=64)
    ref = reference_inputs(processor, [encoder.prompt_text(tasks.get_task(TASK), r) for r in records], records)
    with torch.no_grad():
        expected = hf(**{key: torch.as_tensor(np.asarray(ref[key])) for key in (
            "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")}).logits.numpy()
    got = np.asarray(got)[np.asarray(inputs.attention_mask) == 1]
    expected = expected[ref["attention_mask"] == 1]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= LOGIT_ATOL


def test_stacked_examples_have_the_replay_layout_and_swap_partners(batch_and_records, processor, model_config):
    from recap_jax import evaluator

    batch, records = batch_and_records
    encoder = encode.RecordEncoder(processor, model_config, max_prompt_tokens=256, max_answer_tokens=64)
    examples = [encoder.encode(tasks.get_task(TASK), r) for r in records]
    stacked = encode.stack_vision_fields(examples)
    for key in ("num_images", "num_videos"):
        np.testing.assert_array_equal(stacked[key], batch[key])
    for key in ("image_grids", "video_grid_thw", "second_per_grid_ts"):  # tf.data pads to >= 1 row too
        np.testing.assert_array_equal(stacked[key], batch[key][:, :stacked[key].shape[1]])
        assert not batch[key][:, stacked[key].shape[1]:].any()
    # Image-reliance partners: same set of grids only; rows without images or video never.
    keys = np.array([[1, 4, 4, 1, 4, 6, 0, 0, 0], [0] * 9, [1, 4, 4, 1, 4, 6, 0, 0, 0], [0] * 9,
                     [1, 4, 4, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(evaluator.other_image_partners(keys), [2, -1, 0, -1, -1])
