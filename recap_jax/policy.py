"""The policy a run trains: its tokenizer, model config and parameters, built from the plan,
and the Hugging Face directories it is loaded from and exported to.

    model_config = build_model_config(plan.model)
    processor = build_processor(plan, workdir)           # checked against model_config
    graphdef, params = build_params(plan, model_config, mesh)
    export(graphdef, params, processor, WORKDIR/final)   # a directory transformers loads
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from recap_jax.data import synthetic
from recap_jax.data.tasks import get_task
from recap_jax.models.qwen2_5_vl import checkpoint as checkpoint_lib
from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl import model as model_lib
from recap_jax.models.qwen2_5_vl import processor as processor_lib
from recap_jax.models.qwen2_5_vl.sharded import init_sharded_model

__all__ = ["PRESETS", "build_model_config", "build_params", "build_processor",
           "check_tokenizer_matches", "demo_corpus", "export", "load_params"]

DEMO_CORPUS_RECORDS = 300
PRESETS = {"3b": config_lib.qwen2_5_vl_3b, "7b": config_lib.qwen2_5_vl_7b}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen's 1/4 temporal, 3/8 height, 3/8 width split of the head_dim / 2 frequencies."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return temporal, height, half - temporal - height


def build_model_config(model) -> config_lib.Qwen2_5_VLConfig:
    """The Qwen2_5_VLConfig of a `plan.ModelPlan`: the directory's config.json, a preset of
    the real architecture (3b, 7b), or the tiny model with the plan's sizes."""
    if model.path:
        return config_lib.Qwen2_5_VLConfig.from_json_file(model.path)
    if model.preset != "tiny":
        return PRESETS[model.preset]()
    base = config_lib.tiny(vocab_size=model.vocab_size, text_layers=model.text_layers,
                           vision_depth=model.vision_depth,
                           fullatt_block_indexes=(model.vision_depth - 1,))
    head_dim = model.hidden_size // model.heads
    text = dataclasses.replace(base.text, hidden_size=model.hidden_size,
                               intermediate_size=model.intermediate_size,
                               num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
                               head_dim=head_dim, mrope_section=_mrope_section(head_dim),
                               rope_theta=float(model.rope_theta))
    vision = dataclasses.replace(base.vision, hidden_size=model.vision_hidden_size,
                                 intermediate_size=2 * model.vision_hidden_size,
                                 out_hidden_size=model.hidden_size)
    return dataclasses.replace(base, text=text, vision=vision)


def demo_corpus(plan) -> list[str]:
    """Texts the demo tokenizer learns its merges from: the chat template's words and the
    prompts and targets of the first records of every synthetic source.

    OCR transcriptions are left out (their target is the bare template): random letter
    strings would teach merges such as "KL" or "CE", so one glyph in the image would be one
    token in some answers and half a token in others; without them every letter stays a
    token of its own, the one-to-one reading a tiny model can learn."""
    texts = ["system", "user", "assistant", "You are a helpful assistant."]
    for source in plan.sources:
        if source.kind != "synthetic":
            continue
        task = get_task(source.name)
        for record in synthetic.generate(source.name, "train", DEMO_CORPUS_RECORDS,
                                         layout=source.layout):
            answer = "" if source.name == "ocr" else record.answer_text
            texts += [task.format_prompt(record.question), task.format_target(answer)]
    return texts


def build_processor(plan, workdir: str) -> processor_lib.Qwen2_5_VLProcessor:
    """The Qwen2_5_VLProcessor: tokenizer.path, else model.path, else the demo BPE (built once
    into WORKDIR/tokenizer and reused on resume)."""
    directory = plan.tokenizer.path or plan.model.path
    if not directory:
        directory = os.path.join(workdir, "tokenizer")
        built = os.path.exists(os.path.join(directory, "tokenizer.json"))
        if not built and jax.process_index() == 0:
            processor_lib.build_demo_tokenizer(demo_corpus(plan), plan.model.vocab_size,
                                               directory)
        if jax.process_count() > 1:  # the others read what process 0 wrote
            multihost_utils.sync_global_devices("recap_jax demo tokenizer")
    return processor_lib.Qwen2_5_VLProcessor.from_pretrained(
        directory, min_pixels=plan.tokenizer.min_pixels, max_pixels=plan.tokenizer.max_pixels)


def check_tokenizer_matches(processor, model_config) -> None:
    """ValueError if the tokenizer's special ids are not the model's."""
    ids = processor_lib.special_token_ids(processor.tokenizer)
    wrong = {k: (v, getattr(model_config, k)) for k, v in ids.items()
             if getattr(model_config, k) != v}
    if wrong:
        raise ValueError("the tokenizer's special token ids differ from the model config's "
                         "(tokenizer, model): " + ", ".join(f"{k}={v}" for k, v in wrong.items()))


def _model_kwargs(model) -> dict:
    return dict(dtype=DTYPES[model.compute_dtype], param_dtype=DTYPES[model.param_dtype],
                remat=model.remat)


def build_params(plan, model_config, mesh=None):
    """(graphdef, params) from model.path or a seeded random init, on ``mesh`` when given
    (each parameter created or loaded directly onto its shards)."""
    kwargs = _model_kwargs(plan.model)
    if plan.model.path:
        model = checkpoint_lib.from_pretrained(plan.model.path, mesh=mesh, **kwargs)
    elif mesh is not None:
        model = init_sharded_model(model_config, mesh, seed=plan.seed, **kwargs)
    else:
        model = model_lib.init_model(model_config, seed=plan.seed, **kwargs)
    return nnx.split(model)


def load_params(plan, directory: str, mesh=None):
    """The params of a Hugging Face directory (e.g. WORKDIR/warmstart) in the plan's dtypes."""
    model = checkpoint_lib.from_pretrained(directory, mesh=mesh, **_model_kwargs(plan.model))
    return nnx.split(model)[1]


def export(graphdef, params, processor, directory: str) -> None:
    """The policy as a Hugging Face directory (weights, config and tokenizer) that
    transformers and transformers-based evaluation harnesses load. On several processes
    every process gathers the parameters and process 0 writes."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
    checkpoint_lib.save_pretrained(nnx.merge(graphdef, params), directory)
    processor.tokenizer.save_pretrained(directory)
