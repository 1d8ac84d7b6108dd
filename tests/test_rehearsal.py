"""Rehearsal fixtures: for the paper's configs, the overrides of `write_fixtures` make the plan
valid with its paths checked, every source opens from files in its published format and yields
records, and the tiny checkpoint is a transformers Qwen2.5-VL whose tokenizer has Qwen's
special tokens at the model's ids and the chat template."""

import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from recap_jax import plan as plan_lib
from recap_jax import policy
from recap_jax.data.records import SkipCounter
from recap_jax.data.run_sources import open_sources
from recap_jax.tools import rehearsal
from tests.short_run import load_config


@pytest.fixture(scope="module", params=["hybrid_7b", "rlvr_only_3b"])
def rehearsed(request, tmp_path_factory):
    """(name, config with the rehearsal overrides, overrides, fixture directory)."""
    config = load_config(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    overrides = rehearsal.write_fixtures(str(directory), config)
    return request.param, rehearsal.apply_overrides(load_config(request.param), overrides), overrides, directory


def test_the_plan_is_valid_with_its_paths_checked(rehearsed):
    name, config, overrides, directory = rehearsed
    with pytest.raises(Exception, match="model.path"):
        plan_lib.build_plan(load_config(name))  # without the fixtures: no model
    plan = plan_lib.build_plan(config, check_paths=True)
    assert plan.model.path == str(directory / "model") and plan.tokenizer.path == plan.model.path
    assert [s.steps for s in plan.stages] == [2]
    assert plan.checkpoint_every == 1 and plan.eval_num_examples == 4
    # everything else as configured: precision, mesh, method, RECAP, buckets
    reference = load_config(name)
    assert (plan.model.param_dtype, plan.model.remat) == (reference.model.param_dtype, reference.model.remat)
    assert plan.stages[0].recap is not None and plan.data.prompt_buckets == tuple(reference.data.prompt_buckets)
    assert not [k for k in overrides if k.startswith(("model.param", "model.remat", "mesh", "rl.method", "recap",
                                                      "data.prompt", "rl.max_new_tokens"))]


def test_every_source_opens_from_its_published_format_and_yields_records(rehearsed):
    name, config, _, _ = rehearsed
    plan = plan_lib.build_plan(config, check_paths=True)
    skips = SkipCounter()
    for split, expected in (("train", rehearsal._rows_needed(config)), ("eval", 4)):
        opened = open_sources(plan.sources, split, skips)
        assert len(opened) == len(plan.sources)
        for spec, source in zip(plan.sources, opened):
            records = list(source)
            assert len(records) == expected, (spec.name, split)
            record = records[0]
            assert record.image.ndim == 3 and record.question and record.answer, spec.name
    assert skips.count() == 0, skips.counts()


def test_fixture_files_have_the_datasets_columns(rehearsed):
    name, config, overrides, _ = rehearsed
    for source in config.data.sources.keys():
        path = overrides[f"data.sources.{source}.train"]
        kind = config.data.sources[source].kind
        if path.endswith(".parquet"):
            columns = set(pq.read_schema(path).names)
        else:
            with open(path) as handle:
                columns = set(json.loads(handle.readline()))
        expected = {"thinklite": {"problem", "answer", "image"},
                    "refcoco": {"image", "conversations", "solution", "normal_caption"},
                    "ocr_llava": {"id", "image", "conversations", "data_source"},
                    "lisa": {"image", "problem", "solution"}, "geoqav": {"image", "problem", "answer"},
                    "sat": {"image", "question", "choices", "answer"},
                    "scienceqa": {"image", "question", "choices", "answer"}}[kind]
        assert expected <= columns, (source, columns)
        if kind in ("refcoco", "lisa"):
            image_root = overrides[f"data.sources.{source}.image_root"]
            with open(path) as handle:
                assert os.path.isfile(os.path.join(image_root, json.loads(handle.readline())["image"]))


def test_the_tiny_checkpoint_loads_and_its_tokenizer_is_qwens(rehearsed):
    name, config, _, _ = rehearsed
    plan = plan_lib.build_plan(config, check_paths=True)
    model_config = policy.build_model_config(plan.model)
    processor = policy.build_processor(plan, workdir="/nonexistent")  # read from tokenizer.path
    policy.check_tokenizer_matches(processor, model_config)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "What is 2?"}]}])
    assert "<|im_start|>user" in text and "<|vision_start|><|image_pad|><|vision_end|>" in text
    with open(os.path.join(plan.model.path, "config.json")) as handle:
        assert json.load(handle)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    graphdef, params = policy.build_params(plan, model_config)  # our loader reads the safetensors
    assert np.isfinite(sum(float(np.abs(np.asarray(x, np.float32)).sum()) for x in jax.tree.leaves(params)))


def test_prompts_fit_the_configured_buckets(rehearsed):
    """The replay skips a prompt longer than the largest bucket: the fixtures' must fit it."""
    name, config, _, _ = rehearsed
    plan = plan_lib.build_plan(config, check_paths=True)
    processor = policy.build_processor(plan, workdir="/nonexistent")
    from recap_jax.data.tasks import get_task

    for spec, source in zip(plan.sources, open_sources(plan.sources, "train")):
        record = next(iter(source))
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": get_task(spec.name).format_prompt(record.question)}]}])
        assert record.source == spec.name  # the styled task (e.g. thinklite_released) the run trains
        batch = processor(text=[text], images=[[record.image]])
        assert batch["input_ids"].shape[1] < max(plan.data.prompt_buckets), spec.name


def test_an_unknown_kind_or_field_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.sources.x.kind='nope'"):
        rehearsal.write_source(str(tmp_path), "x", "nope", 2, 1)
    config = load_config("demo")
    with pytest.raises(KeyError, match="rl.nope"):
        rehearsal.apply_overrides(config, {"rl.nope": 1})
    with pytest.raises(ValueError, match="steps"):
        rehearsal.write_fixtures(str(tmp_path), config, steps=0)


def test_a_synthetic_config_gets_only_the_model_and_the_cuts(tmp_path):
    config = load_config("demo")
    overrides = rehearsal.write_fixtures(str(tmp_path), config, steps=3)
    assert not [k for k in overrides if k.startswith("data.")]
    assert overrides["sft.steps"] == 3 and overrides["rl.steps"] == 3
    plan = plan_lib.build_plan(rehearsal.apply_overrides(config, overrides), check_paths=True)
    assert plan.model.path == str(tmp_path / "model")


def test_cpu_lengths_cut_completions_and_answer_buckets_only_downwards():
    config = load_config("hybrid_7b")
    cuts = rehearsal.cpu_length_cuts(config)
    assert cuts == {"rl.max_new_tokens": 64, "eval.max_new_tokens": 64, "data.answer_buckets": (64, 256)}
    config.rl.max_new_tokens, config.data.answer_buckets = 16, (512, 1024)
    cuts = rehearsal.cpu_length_cuts(config)
    assert cuts["rl.max_new_tokens"] == 16 and cuts["data.answer_buckets"] == (512,)


def test_an_update_is_judged_at_the_last_step_of_its_accumulation_window():
    from recap_jax.rehearse import _updates_rounded_away

    def line(step, grad, update):
        return {"step": step, "grad_norm": grad, "update_norm": update}

    # windows of 2 (optax.MultiSteps applies at steps 2 and 4): step 1's gradient is applied
    # at step 2 (moved); step 3's at step 4 (rounded away); a window without a gradient is
    # not judged, whatever its update (Adam's momentum may still move it)
    lines = [line(1, 0.5, 0.0), line(2, 0.0, 1e-3), line(3, 0.2, 0.0), line(4, 0.0, 0.0)]
    assert _updates_rounded_away(lines, 2) == ([4], 2)
    assert _updates_rounded_away(lines, 1) == ([1, 3], 2)
    assert _updates_rounded_away([line(1, 0.0, 0.0), line(2, 0.0, 0.3)], 2) == ([], 0)
