"""Qwen2.5-VL architecture configuration.

`Qwen2_5_VLConfig` is built from a checkpoint's ``config.json`` in either spelling:

* the hub's flat one (Qwen's published files): text fields at the top level,
  ``rope_scaling: {"type": "mrope", "mrope_section": [...]}`` and ``rope_theta``;
* transformers 5.x's nested one: ``text_config`` with ``rope_parameters``
  (``{"rope_type": "default", "rope_theta": ..., "mrope_section": [...]}``).

`to_hf_dict()` writes the nested spelling, which transformers 5.x loads directly.
Only architecture lives here; precision and rematerialisation are runtime policies.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Special-token ids shared by every released Qwen2.5-VL checkpoint.
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


class ConfigError(ValueError):
    """An impossible or malformed configuration value; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _positive_int(value: Any, field: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
             f"must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT encoder and patch merger.

    The encoder sees patches of ``temporal_patch_size x patch_size x patch_size`` pixels;
    self-attention is restricted to windows of ``window_size`` pixels except in the blocks
    listed in ``fullatt_block_indexes``; the merger concatenates
    ``spatial_merge_size**2`` neighbouring patches and projects them to ``out_hidden_size``
    (the text model's hidden size).
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                     "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                     "out_hidden_size"):
            _positive_int(getattr(self, name), f"vision_config.{name}")
        _require(self.hidden_size % self.num_heads == 0, "vision_config.hidden_size",
                 f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _require(self.head_dim % 4 == 0, "vision_config.num_heads",
                 f"head_dim {self.head_dim} must be divisible by 4 for the 2D rotary embedding")
        for i in self.fullatt_block_indexes:
            _require(isinstance(i, int) and 0 <= i < self.depth, "vision_config.fullatt_block_indexes",
                     f"index {i!r} is outside [0, depth={self.depth})")
        merged_patch = self.patch_size * self.spatial_merge_size
        _require(self.window_size % merged_patch == 0, "vision_config.window_size",
                 f"{self.window_size} must be a multiple of patch_size*spatial_merge_size={merged_patch}")
        _require(self.tokens_per_second > 0, "vision_config.tokens_per_second",
                 f"must be positive, got {self.tokens_per_second!r}")
        _require(self.hidden_act == "silu", "vision_config.hidden_act",
                 f"only 'silu' is supported, got {self.hidden_act!r}")
        _require(self.rms_norm_eps > 0, "vision_config.rms_norm_eps", "must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Number of patches the merger folds into one text token."""
        return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder: GQA with q/k/v biases, RMSNorm, SwiGLU, M-RoPE.

    ``mrope_section`` splits the rotary frequencies (head_dim / 2 of them) into the
    temporal, height and width parts of multimodal RoPE.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            _positive_int(getattr(self, name), f"text_config.{name}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, "text_config.head_dim", f"must be even, got {self.head_dim}")
        _require(len(self.mrope_section) == 3 and all(isinstance(s, int) and s >= 0 for s in self.mrope_section),
                 "text_config.mrope_section", f"must be three non-negative integers, got {self.mrope_section!r}")
        _require(sum(self.mrope_section) == self.head_dim // 2, "text_config.mrope_section",
                 f"{list(self.mrope_section)} sums to {sum(self.mrope_section)}, "
                 f"but must sum to head_dim/2 = {self.head_dim // 2}")
        _require(self.rope_theta > 0, "text_config.rope_theta", f"must be positive, got {self.rope_theta!r}")
        _require(self.rms_norm_eps > 0, "text_config.rms_norm_eps", "must be positive")
        _require(self.hidden_act == "silu", "text_config.hidden_act",
                 f"only 'silu' is supported, got {self.hidden_act!r}")
        _require(not self.use_sliding_window, "text_config.use_sliding_window",
                 "sliding-window attention is not supported (no released Qwen2.5-VL uses it)")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self):
        _require(self.vision.out_hidden_size == self.text.hidden_size, "vision_config.out_hidden_size",
                 f"{self.vision.out_hidden_size} must equal the text hidden_size {self.text.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            _require(isinstance(value, int) and 0 <= value < self.text.vocab_size, name,
                     f"{value!r} is not a token id in [0, vocab_size={self.text.vocab_size})")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "Qwen2_5_VLConfig":
        """Builds the config from a config.json dict (flat hub or nested transformers-5 spelling)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in (None, "qwen2_5_vl"):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl'")
        try:
            text = _text_config_from_dict(raw)
            vision = _vision_config_from_dict(raw.get("vision_config") or {})
            text_raw = raw.get("text_config") or {}
            tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
            text = dataclasses.replace(text, tie_word_embeddings=bool(tie))
            top = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id") if k in raw}
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in raw:
                    top[key] = raw[key]
                elif key in text_raw:
                    top[key] = text_raw[key]
            return cls(text=text, vision=vision, **top)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # wrong value types that slipped through, e.g. a string depth
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen2_5_VLConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=path)

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        """The nested transformers-5 spelling of config.json (also readable by from_dict)."""
        t, v = self.text, self.vision
        text_config = {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        vision_config = {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size,
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": v.hidden_act,
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }


def _text_config_from_dict(raw: Mapping[str, Any]) -> TextConfig:
    nested = raw.get("text_config")
    source = nested if isinstance(nested, Mapping) and nested.get("hidden_size") is not None else raw
    rope = source.get("rope_parameters") or source.get("rope_scaling") or raw.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"text_config.rope_parameters: expected an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "mrope"))
    if rope_type not in ("mrope", "default"):
        raise ConfigError(f"text_config.rope_parameters.rope_type: {rope_type!r} is not supported "
                          "(expected 'mrope' or 'default' with an mrope_section)")
    if "mrope_section" not in rope:
        raise ConfigError("text_config.rope_parameters.mrope_section: missing; Qwen2.5-VL needs the "
                          "temporal/height/width split of the rotary frequencies")
    theta = rope.get("rope_theta", source.get("rope_theta", raw.get("rope_theta", 1000000.0)))
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    kwargs = {k: source[k] for k in fields if k in source and k not in ("mrope_section", "rope_theta")}
    kwargs.pop("tie_word_embeddings", None)
    if kwargs.get("head_dim") is None:
        kwargs.pop("head_dim", None)
    kwargs["use_sliding_window"] = bool(kwargs.get("use_sliding_window") or False)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in kwargs]
    if missing:
        raise ConfigError(f"text_config: missing required fields {missing}")
    kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
    if kwargs["num_key_value_heads"] is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return TextConfig(mrope_section=tuple(rope["mrope_section"]), rope_theta=float(theta), **kwargs)


def _vision_config_from_dict(raw: Mapping[str, Any]) -> VisionConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"vision_config: expected an object, got {raw!r}")
    aliases = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth", "in_chans": "in_channels"}
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    kwargs = {}
    for key, value in raw.items():
        key = aliases.get(key, key)
        if key in fields and key != "rope_theta":
            kwargs[key] = value
    rope = raw.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            values = set(kwargs[key])
            if len(values) != 1:
                raise ConfigError(f"vision_config.{key}: non-square patches {kwargs[key]} are not supported")
            kwargs[key] = values.pop()
    return VisionConfig(**kwargs)


# ---------------------------------------------------------------------- presets
def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct's published dimensions (tied embeddings)."""
    return Qwen2_5_VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, rope_theta=1000000.0,
                        mrope_section=(16, 24, 24), max_position_embeddings=128000, tie_word_embeddings=True),
        vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            out_hidden_size=2048, fullatt_block_indexes=(7, 15, 23, 31), window_size=112,
                            tokens_per_second=2),
    )


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's published dimensions (untied embeddings)."""
    return Qwen2_5_VLConfig(
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                        mrope_section=(16, 24, 24), max_position_embeddings=128000, tie_word_embeddings=False),
        vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31), window_size=112,
                            tokens_per_second=2),
    )


def tiny(vocab_size: int = 512, *, tie_word_embeddings: bool = False, text_layers: int = 2,
         vision_depth: int = 2, fullatt_block_indexes: tuple[int, ...] = (1,),
         window_size: int = 56) -> Qwen2_5_VLConfig:
    """A tiny model with the real architecture, for tests and the CPU demo.

    Special tokens sit at the top of the vocabulary so that a small tokenizer can hold them.
    head_dim = 16, mrope_section (2, 3, 3) sums to head_dim / 2.
    """
    return Qwen2_5_VLConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings),
        vision=VisionConfig(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, fullatt_block_indexes=fullatt_block_indexes,
                            window_size=window_size, tokens_per_second=2),
        image_token_id=vocab_size - 4, video_token_id=vocab_size - 3,
        vision_start_token_id=vocab_size - 6, vision_end_token_id=vocab_size - 5,
        bos_token_id=None, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
    )


PRESETS = {"3b": qwen2_5_vl_3b, "7b": qwen2_5_vl_7b, "tiny": tiny}
