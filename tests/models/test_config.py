"""Config from both config.json spellings, presets, and clear errors on impossible values."""

import json

import pytest
import transformers

from recap_jax.models.qwen2_5_vl import config as C

# The published Qwen2.5-VL-7B-Instruct config.json (hub's flat spelling), as downloaded.
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_hub_flat_spelling_equals_7b_preset():
    assert C.Qwen2_5_VLConfig.from_dict(HUB_7B) == C.qwen2_5_vl_7b()


def test_transformers_nested_spelling_round_trips_through_transformers(tmp_path):
    """transformers' own config class reads our dict and writes one we read back unchanged."""
    for cfg in (C.qwen2_5_vl_3b(), C.qwen2_5_vl_7b(), C.tiny(), C.tiny(tie_word_embeddings=True)):
        hf = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
        hf.save_pretrained(tmp_path)
        nested = json.loads((tmp_path / "config.json").read_text())
        assert "text_config" in nested and "rope_parameters" in nested["text_config"]
        assert C.Qwen2_5_VLConfig.from_json_file(tmp_path) == cfg
        assert hf.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
        assert hf.vision_config.fullatt_block_indexes == list(cfg.vision.fullatt_block_indexes)


def test_hub_config_through_transformers_matches():
    hf = transformers.Qwen2_5_VLConfig(**HUB_7B)
    ours = C.Qwen2_5_VLConfig.from_dict(HUB_7B)
    assert hf.text_config.num_key_value_heads == ours.text.num_key_value_heads
    assert hf.text_config.rope_parameters["rope_theta"] == ours.text.rope_theta
    assert hf.vision_config.out_hidden_size == ours.vision.out_hidden_size


def test_published_dimensions():
    three, seven = C.qwen2_5_vl_3b(), C.qwen2_5_vl_7b()
    assert (three.text.hidden_size, three.text.num_hidden_layers, three.text.num_key_value_heads) == (2048, 36, 2)
    assert three.text.tie_word_embeddings and not seven.text.tie_word_embeddings
    assert (seven.text.hidden_size, seven.text.intermediate_size, seven.text.head_dim) == (3584, 18944, 128)
    assert seven.vision.patch_dim == 1176


@pytest.mark.parametrize("path,value,field", [
    (("vision_config", "num_heads"), 7, "vision_config.hidden_size"),
    (("vision_config", "depth"), 0, "vision_config.depth"),
    (("vision_config", "fullatt_block_indexes"), [7, 40], "vision_config.fullatt_block_indexes"),
    (("vision_config", "window_size"), 100, "vision_config.window_size"),
    (("vision_config", "out_hidden_size"), 1000, "vision_config.out_hidden_size"),
    (("num_key_value_heads",), 5, "text_config.num_key_value_heads"),
    (("rope_scaling",), {"type": "mrope", "mrope_section": [16, 24, 20]}, "text_config.mrope_section"),
    (("rope_scaling",), {"type": "yarn", "factor": 4}, "rope_type"),
    (("hidden_size",), -1, "text_config.hidden_size"),
    (("image_token_id",), 10 ** 9, "image_token_id"),
    (("model_type",), "llava", "model_type"),
])
def test_impossible_values_name_the_field(path, value, field):
    raw = json.loads(json.dumps(HUB_7B))
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.Qwen2_5_VLConfig.from_dict(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(C.ConfigError, match="no config.json"):
        C.Qwen2_5_VLConfig.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(C.ConfigError, match="not valid JSON"):
        C.Qwen2_5_VLConfig.from_json_file(tmp_path)
