"""Run-config validation: every invalid value fails before anything is built or compiled,
naming the field and the allowed values; the paper's two configs validate once paths exist."""

import time

import pytest

from recap_jax import plan, run_config, train
from recap_jax.data.tasks import objective_names
from recap_jax.run_config import ConfigError
from tests.short_run import load_config, override, short_config

INVALID = [
    # (field, value, words the message must contain)
    ("rl.temperature", 0.0, ["rl.temperature", "(0.0"]),
    ("rl.temperature", -1.0, ["rl.temperature"]),
    ("rl.top_p", 0.0, ["rl.top_p"]),
    ("recap.window", 0, ["recap.window", ">= 1"]),
    ("recap.alpha", 1.5, ["recap.alpha", "[0, 1]"]),
    ("recap.alpha", -0.1, ["recap.alpha"]),
    ("recap.temperature", 0.0, ["recap.temperature"]),
    ("recap.variant", "eq1", ["recap.variant", "released | paper | static | dwa"]),
    ("rl.method", "grpo_plus", ["rl.method", "reasoning_only", "modomodo", "recap"]),
    ("rl.group_size", 0, ["rl.group_size"]),
    ("rl.prompts_per_step", 0, ["rl.prompts_per_step"]),
    ("rl.num_minibatches", 0, ["rl.num_minibatches", ">= 1"]),
    ("rl.weighting", "both", ["rl.weighting", "reward | loss"]),
    ("mesh.process_id", 3, ["mesh.process_id"]),
    ("data.primary", "ocr", ["data.primary", "RL task"]),
    ("rl.epsilon_low", 1.0, ["rl.epsilon_low"]),
    ("rl.dual_clip_c", 0.5, ["rl.dual_clip_c"]),
    ("rl.learning_rate", 0.0, ["rl.learning_rate"]),
    ("rl.max_bad_steps", 0, ["rl.max_bad_steps"]),
    ("sft.steps", -1, ["sft.steps"]),
    ("eval.batch_size", 0, ["eval.batch_size"]),
    ("model.kv_heads", 3, ["model.kv_heads", "divisor"]),
    ("model.rope_theta", 0.5, ["model.rope_theta", "[1.0"]),
    ("model.param_dtype", "int8", ["model.param_dtype", "bfloat16"]),
    ("model.logits_chunk", -64, ["model.logits_chunk", ">= 0"]),
    ("model.path", "/nonexistent/qwen", ["model.path", "config.json"]),
    ("tokenizer.path", "/nonexistent/tok", ["tokenizer.path"]),
    ("data.primary", "sat", ["data.primary", "reasoning"]),
    ("data.sources.reasoning.kind", "webdataset", ["data.sources.reasoning.kind", "synthetic"]),
    ("data.sources.ocr.size", 0, ["data.sources.ocr.size"]),
    ("data.sources.ocr.layout", "spiral", ["data.sources.ocr.layout", "free | grid"]),
    ("data.modomodo_shares", "0.5,0.5", ["data.modomodo_shares", "3 comma-separated"]),
    ("sft.source_shares", "0,0,0", ["sft.source_shares", "not all 0"]),
    ("sft.source_shares", "1,x,1", ["sft.source_shares", "3 comma-separated"]),
    ("mesh.spec", "fsdp=3", ["mesh.spec"]),
    ("mesh.spec", "data=8,fsdp=1", ["rl.prompts_per_step", "batch shards"]),
]


@pytest.mark.parametrize("field, value, words", INVALID, ids=[f"{f}={v}" for f, v, _ in INVALID])
def test_invalid_value_names_the_field_and_what_is_allowed(field, value, words):
    config = override(short_config(), {field: value})
    if field == "mesh.process_id":  # explicit coordinator fields need a distributed mesh
        config = override(config, {"mesh.spec": "fsdp=1", "mesh.distributed": True,
                                   "mesh.coordinator_address": "127.0.0.1:1234",
                                   "mesh.num_processes": 2})
    with pytest.raises(ConfigError) as error:
        plan.build_plan(config)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_the_demo_and_its_shrunk_form_are_valid():
    run_config.validate(load_config("demo"))
    run_config.validate(short_config())


def test_unknown_task_is_refused():
    import ml_collections

    config = short_config()
    config.data.sources = ml_collections.ConfigDict(
        {"reasoning": config.data.sources.reasoning, "maths": config.data.sources.ocr})
    with pytest.raises(ConfigError, match="data.sources.maths.*registered task"):
        run_config.validate(config)


def test_modomodo_without_shares_for_synthetic_sources_is_refused():
    config = override(short_config(), {"rl.method": "modomodo"})
    with pytest.raises(ConfigError, match="modomodo_shares"):
        run_config.validate(config)
    run_config.validate(override(config, {"data.modomodo_shares": "0.5,0.3,0.2"}))


def test_train_fails_before_building_anything(tmp_path):
    """An invalid config stops train() within the validation: no model, no compilation, no
    files in the workdir."""
    config = override(short_config(), {"recap.window": 0})
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="recap.window"):
        train.train(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 5  # no compilation happened (generous bound)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, sources, k", [
    ("hybrid_7b", ["thinklite", "ocr_llava", "refcoco"], 5),
    ("rlvr_only_3b", ["scienceqa", "geoqav", "lisa", "sat"], 8),
])
def test_paper_configs_need_local_paths_then_validate(tmp_path, name, sources, k):
    config = load_config(name)
    with pytest.raises(ConfigError, match="model.path"):
        run_config.validate(config)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    config.model.path = str(model_dir)
    with pytest.raises(ConfigError, match=f"data.sources.{sources[0]}.train"):
        run_config.validate(config)
    for source in sources:
        data = tmp_path / f"{source}.jsonl"
        data.write_text("")
        config.data.sources[source].train = str(data)
    config.data.sources[sources[0]].image_root = str(tmp_path / "missing_images")
    with pytest.raises(ConfigError, match="image_root"):
        run_config.validate(config)
    config.data.sources[sources[0]].image_root = str(tmp_path)
    run_config.validate(config)
    assert run_config.source_names(config) == sources
    assert len(objective_names(sources)) == k


def test_an_sft_only_mix_is_fine_for_a_warm_start_and_refused_for_rl(tmp_path):
    """OCR alone (an SFT task): the warm-start runs (rl.steps = 0, no RL machinery built);
    with rl.steps > 0 the config is refused before anything is built."""
    import ml_collections

    config = short_config(rl__steps=0, sft__steps=2, eval__num_examples=2)
    config.data.sources = ml_collections.ConfigDict({"ocr": config.data.sources.ocr})
    config.data.primary = "ocr"
    train.train(config, str(tmp_path / "run"))
    assert (tmp_path / "run" / "warmstart" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="data.primary.*RL task"):
        run_config.validate(override(config, {"rl.steps": 3}))


@pytest.mark.parametrize("argument, alpha", [("anneal", "anneal"), ("0.25", 0.25), ("1", 1.0)])
def test_recap_alpha_takes_a_number_or_anneal_from_the_command_line(argument, alpha):
    """The paper's alpha ablation includes "anneal": train's own flag parser must pass it
    through to RECAP (a float-typed field rejected it before any of our code ran)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", "--config=configs/demo.py", f"--config.recap.alpha={argument}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    recap_config = plan.build_plan(flag_values.config).stage("rl").recap
    assert recap_config.alpha == alpha and type(recap_config.alpha) is type(alpha)
