"""Several images, no image, and a video through our processor, against transformers'
Qwen2_5_VLProcessor built offline around the same demo tokenizer, and M-RoPE positions of
the result against transformers' get_rope_index.

The reference video processor: transformers' Qwen2VLVideoProcessor imports torchvision, which
is not installable here, so the reference processor is handed `ReferenceVideoProcessor`:
Qwen2VLImageProcessorPil's resize/rescale/normalize per frame plus the torch view/permute of
Qwen2VLVideoProcessor.patchify (tests/models/test_processor.reference_video). Everything
else - placeholder expansion, second_per_grid_ts = temporal_patch_size / sampled_fps,
tokenisation, padding, mm_token_type_ids - is transformers' own code.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import processor as proc
from recap_jax.models.qwen2_5_vl import rope
from tests.models.test_processor import CORPUS, HFProcessor, random_rgb, reference_processor, reference_video

MIN_PIXELS, MAX_PIXELS = 3136, 60_000
VOCAB = 400
CONFIG = config_lib.tiny(vocab_size=VOCAB, text_layers=1, vision_depth=1, fullatt_block_indexes=(0,))
USER_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
USER_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


class ReferenceVideoProcessor:
    """The part of Qwen2VLVideoProcessor the reference processor calls (see module doc)."""

    temporal_patch_size, merge_size, patch_size = 2, 2, 14

    def __call__(self, videos, video_metadata=None, **kwargs):
        outs = [reference_video(list(frames), MIN_PIXELS, MAX_PIXELS) for frames in videos]
        return {"pixel_values_videos": np.concatenate([p for p, _ in outs]),
                "video_grid_thw": np.stack([g for _, g in outs]),
                "video_metadata": video_metadata}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tokenizer")
    proc.build_demo_tokenizer(CORPUS, VOCAB, out)
    return out


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return proc.Qwen2_5_VLProcessor.from_pretrained(tokenizer_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def reference(ours):
    class OfflineProcessor(HFProcessor):  # the class check needs torchvision's video processor
        def check_argument_for_proper_class(self, name, arg):
            return None

    return OfflineProcessor(image_processor=reference_processor(MIN_PIXELS, MAX_PIXELS), tokenizer=ours.tokenizer,
                            video_processor=ReferenceVideoProcessor())


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(HFConfig(**CONFIG.to_hf_dict())).eval()


def reference_positions(model, out):
    """transformers' M-RoPE positions of a processor output (with its mm_token_type_ids)."""
    def tensor(key, dtype=None):
        return None if out.get(key) is None else torch.as_tensor(np.asarray(out[key]), dtype=dtype)

    positions, deltas = model.model.get_rope_index(
        tensor("input_ids", torch.long), mm_token_type_ids=tensor("mm_token_type_ids", torch.long),
        image_grid_thw=tensor("image_grid_thw", torch.long), video_grid_thw=tensor("video_grid_thw", torch.long),
        second_per_grid_ts=tensor("second_per_grid_ts", torch.float32),
        attention_mask=tensor("attention_mask", torch.long))
    return positions.numpy(), deltas.numpy()


def assert_same_as_reference(ours_out, ref_out, hf_model):
    np.testing.assert_array_equal(ours_out["input_ids"], ref_out["input_ids"])
    np.testing.assert_array_equal(ours_out["attention_mask"], ref_out["attention_mask"])
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if ours_out[grid] is None:
            assert ref_out.get(grid) is None and ref_out.get(pixels) is None, grid
            continue
        np.testing.assert_array_equal(ours_out[grid], ref_out[grid])
        assert ours_out[pixels].shape == ref_out[pixels].shape
        assert np.max(np.abs(ours_out[pixels] - ref_out[pixels])) <= 1e-5, pixels
    if ours_out["second_per_grid_ts"] is None:
        assert ref_out.get("second_per_grid_ts") is None
    else:
        np.testing.assert_allclose(ours_out["second_per_grid_ts"], np.asarray(ref_out["second_per_grid_ts"]),
                                   rtol=1e-7)
    # M-RoPE: ours from input_ids (modalities from token ids), theirs from mm_token_type_ids.
    positions, deltas = rope.get_rope_index(ours_out["input_ids"], ours_out["image_grid_thw"],
                                            ours_out["video_grid_thw"], ours_out["second_per_grid_ts"],
                                            ours_out["attention_mask"], CONFIG)
    ref_positions, ref_deltas = reference_positions(hf_model, ref_out)
    np.testing.assert_array_equal(positions, ref_positions)
    np.testing.assert_array_equal(deltas, ref_deltas)
    return positions


def chat(ours, images: int, video: bool, question: str) -> str:
    content = [{"type": "image"}] * images + ([{"type": "video"}] if video else [])
    return ours.apply_chat_template([{"role": "user", "content": [*content, {"type": "text", "text": question}]}])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_two_images_and_text_only_rows_match_transformers(ours, reference, hf_model, padding_side):
    images = [PIL.Image.fromarray(random_rgb(h, w, seed=h)) for h, w in [(60, 90), (130, 45)]]
    texts = [chat(ours, 2, False, "Which picture is brighter?"), chat(ours, 0, False, "What is 2 + 3?")]
    out = ours(texts, [images, []], padding_side=padding_side)
    ref = reference(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="np")
    positions = assert_same_as_reference(out, ref, hf_model)
    grids = [proc.preprocess_image(im, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)[1] for im in images]
    assert out["image_grid_thw"].shape == (2, 3) and out["pixel_values_videos"] is None
    assert (out["input_ids"] == ours.image_token_id).sum(1).tolist() == [sum(g.prod() for g in grids) // 4, 0]
    # The text-only row's positions are plain 0..n-1 on all three axes.
    row = out["attention_mask"][1] == 1
    np.testing.assert_array_equal(positions[:, 1, row], np.broadcast_to(np.arange(row.sum()), (3, row.sum())))


def test_text_only_batch_matches_transformers(ours, reference, hf_model):
    texts = [chat(ours, 0, False, "What is 2 + 3?"), chat(ours, 0, False, "Count to ten, slowly.")]
    out = ours(texts)
    ref = reference(text=texts, padding=True, padding_side="left", return_tensors="np")
    assert_same_as_reference(out, ref, hf_model)
    assert all(out[key] is None for key in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                             "video_grid_thw", "second_per_grid_ts"))


def test_video_of_four_frames_at_two_fps_matches_transformers(ours, reference, hf_model):
    frames = [random_rgb(70, 100, seed=10 + k) for k in range(4)]
    texts = [chat(ours, 0, True, "What moves?")]
    out = ours(texts, videos=[[frames]], video_fps=2.0)
    metadata = [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]
    ref = reference(text=texts, videos=[np.stack(frames)], video_metadata=metadata, padding=True,
                    padding_side="left", return_tensors="np")
    positions = assert_same_as_reference(out, ref, hf_model)
    grid = out["video_grid_thw"][0]
    assert grid[0] == 2 and out["second_per_grid_ts"].tolist() == [1.0]  # 4 frames / T_p = 2; 2 / 2 fps
    assert (out["input_ids"] == ours.video_token_id).sum() == grid.prod() // 4
    # Hand-worked: temporal patch 1 is 1 s later = tokens_per_second positions further.
    video = out["input_ids"][0] == ours.video_token_id
    t = positions[0, 0, video]
    assert t.max() - t.min() == CONFIG.vision.tokens_per_second


def test_images_and_video_in_one_row_and_per_video_fps(ours, reference, hf_model):
    image = random_rgb(50, 80, seed=3)
    frames_a = [random_rgb(40, 60, seed=20 + k) for k in range(3)]  # odd count: last frame repeated
    frames_b = [random_rgb(90, 50, seed=30 + k) for k in range(2)]
    texts = [chat(ours, 1, True, "Is the image in the video?"), f"{USER_VIDEO} and nothing else"]
    out = ours(texts, images=[[image], []], videos=[[frames_a], [frames_b]], video_fps=[3.0, 0.5])
    metadata = [VideoMetadata(total_num_frames=3, fps=3.0, frames_indices=[0, 1, 2]),
                VideoMetadata(total_num_frames=2, fps=0.5, frames_indices=[0, 1])]
    ref = reference(text=texts, images=[image], videos=[np.stack(frames_a), np.stack(frames_b)],
                    video_metadata=metadata, padding=True, padding_side="left", return_tensors="np")
    assert_same_as_reference(out, ref, hf_model)
    np.testing.assert_allclose(out["second_per_grid_ts"], [2 / 3, 4.0], rtol=1e-6)


def test_video_budgets_default_to_the_image_budgets_and_can_differ(ours, tokenizer_dir, tmp_path):
    assert ours.video_kwargs == ours.image_kwargs
    frames = [random_rgb(400, 400, seed=k) for k in range(2)]
    grid = ours([USER_VIDEO], videos=[[frames]])["video_grid_thw"][0]
    assert grid[1] * grid[2] * 14 * 14 <= MAX_PIXELS < 400 * 400  # the image budget applies
    small = proc.Qwen2_5_VLProcessor(ours.tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                     video_max_pixels=3136)
    assert small([USER_VIDEO], videos=[[frames]])["video_grid_thw"].tolist() == [[1, 4, 4]]  # 56 x 56
    assert small.image_kwargs == ours.image_kwargs
    # From a checkpoint directory: video_preprocessor_config.json, as transformers writes it.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "video_preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 3136, "longest_edge": 20000}, "temporal_patch_size": 2}')
    loaded = proc.Qwen2_5_VLProcessor.from_pretrained(tmp_path)
    assert (loaded.video_kwargs["min_pixels"], loaded.video_kwargs["max_pixels"]) == (3136, 20000)
    assert loaded.image_kwargs["max_pixels"] == proc.DEFAULT_MAX_PIXELS


def test_video_errors_name_the_sample(ours):
    frames = [random_rgb(40, 40, seed=k) for k in range(2)]
    with pytest.raises(ValueError, match=r"sample 1: text has 1 <\|video_pad\|> placeholders but 0 videos"):
        ours(["hi", USER_VIDEO], videos=[[], []])
    with pytest.raises(ValueError, match="video_fps has 2 entries for 1 videos"):
        ours([USER_VIDEO], videos=[[frames]], video_fps=[2.0, 1.0])
    with pytest.raises(ValueError, match="fps must be a positive number"):
        ours([USER_VIDEO], videos=[[frames]], video_fps=0)
    with pytest.raises(ValueError, match=r"sample 0, video 0: .*one size"):
        ours([USER_VIDEO], videos=[[[random_rgb(40, 40), random_rgb(40, 60)]]])


def test_expand_vision_placeholders_keeps_the_order_of_images_and_videos():
    text = f"a{proc.VIDEO_PAD}b{proc.IMAGE_PAD}c{proc.IMAGE_PAD}d"
    assert proc.expand_vision_placeholders(text, [2, 1], [3]) == (
        f"a{proc.VIDEO_PAD * 3}b{proc.IMAGE_PAD * 2}c{proc.IMAGE_PAD}d")
    with pytest.raises(ValueError, match="1 <\\|video_pad\\|> placeholders but 0 videos"):
        proc.expand_vision_placeholders(text, [2, 1], [])
