"""Qwen2.5-VL in Flax NNX, loaded from and saved to Hugging Face checkpoint directories.

    model = from_pretrained("/path/to/Qwen2.5-VL-7B-Instruct", dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask, pixel_values=..., image_grid_thw=...)
    save_pretrained(model, "/path/to/out")

Names are resolved on first use, so importing one submodule (config, processor) does not
import the whole model.
"""

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "from_pretrained": "checkpoint", "save_pretrained": "checkpoint",
    "ConfigError": "config", "Qwen2_5_VLConfig": "config", "TextConfig": "config", "VisionConfig": "config",
    "qwen2_5_vl_3b": "config", "qwen2_5_vl_7b": "config", "tiny": "config",
    "InputError": "model", "ModelInputs": "model", "Qwen2_5_VLForConditionalGeneration": "model",
    "init_model": "model", "prepare_inputs": "model", "init_sharded_model": "sharded",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
