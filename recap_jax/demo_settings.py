"""The settings of the main job (`python -m recap_jax.demo`) and of the warm-start it starts
from (`scripts/build_demo_warmstart.py`), as --config.<field>=<value> overrides of
configs/demo.py. They are those of experiments/forgetting_in_miniature/run.py (its README has
the pilots behind each value), except where a comment says otherwise.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from recap_jax.run_config import apply_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
WARMSTART_DIR = REPO / "assets" / "demo_warmstart"
MANIFEST_NAME = "SHA256SUMS"

# Data and evaluation, the same in both warm-start stages and in the RL runs (the RL runs must
# evaluate what the warm-start was trained on). Grounding and OCR on the "grid" layout: on the
# free layout the tiny model never used its images (RESULTS_free_layout.md of the miniature).
DATA = {
    "data.sources.grounding.layout": "grid",
    "data.sources.ocr.layout": "grid",
    "log.tensorboard": False,  # metrics.jsonl is all the demo reads
}

# Stage 1 of the warm-start: OCR alone, from scratch, 800 steps (the OCR plateau at ~2.15
# nats per token breaks after ~230 steps when OCR is trained alone, never in the mixture).
OCR_FIRST = {
    "rl.steps": 0,
    "sft.steps": 800,
    "sft.source_shares": "0,0,1",  # reasoning, grounding, ocr
    "checkpoint.every_steps": 200,
}

# Stage 2: the demo's mixed SFT from stage 1's model and tokenizer (model.path and
# tokenizer.path are added), 1500 steps instead of configs/demo.py's 300.
MIXED = {
    "rl.steps": 0,
    "sft.steps": 1500,
    "checkpoint.every_steps": 300,
}

# Every RL run of the demo (model.path = tokenizer.path = the stored warm-start).
RL = {
    "sft.steps": 0,
    # the miniature's learning rate: the demo's 2e-5 barely moves the tiny model; at 3e-4
    # reasoning-only RL holds or raises reasoning while grounding and OCR erode
    "rl.learning_rate": 3e-4,
    # W scaled to the run: an objective's history advances only when its source is drawn
    # (every third step under round robin)
    "recap.window": 5,
    "rl.log_lambda_effect": True,
    "checkpoint.every_steps": 0,  # one checkpoint, at the end
    "checkpoint.keep": 1,
    "log.every_steps": 25,
}

# Per method: the RL method and its own settings (the same seed and steps for both).
METHODS = {
    "reasoning_only": {"rl.method": "reasoning_only"},
    "recap": {"rl.method": "recap", "recap.variant": "released"},
}


def load_demo_config() -> ml_collections.ConfigDict:
    """configs/demo.py's get_config()."""
    spec = importlib.util.spec_from_file_location("recap_jax_demo_config", DEMO_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def demo_config(*overrides: dict) -> ml_collections.ConfigDict:
    """configs/demo.py with DATA and then each of ``overrides`` applied in order."""
    config = load_demo_config()
    for table in (DATA, *overrides):
        apply_overrides(config, table)
    return config

# The main job's defaults: RL steps per method (50 batches per source under round robin for
# recap, as in the miniature) and held-out records per task (with 256, a [0, 1] metric's
# record-sampling standard error is at most 0.031).
DEMO_STEPS = 150
DEMO_EVAL_EXAMPLES = 256
