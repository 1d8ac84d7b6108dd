"""A short training run shared by the end-to-end tests: configs/demo.py shrunk by command-line
style overrides (the same fields a user would override), small enough for CI."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (field, value) pairs applied to configs/demo.py, as --config.<field>=<value> would.
SHORT_RUN_OVERRIDES = {
    "sft.steps": 4, "sft.batch_size": 4,
    "rl.steps": 4, "rl.prompts_per_step": 2, "rl.group_size": 2, "rl.max_new_tokens": 8,
    "checkpoint.every_steps": 2, "checkpoint.keep": 3, "eval.num_examples": 4, "eval.batch_size": 4,
    "eval.max_new_tokens": 8, "log.every_steps": 2, "log.tensorboard": True,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.vision_hidden_size": 32,
    "model.text_layers": 1, "model.vision_depth": 1,
    "data.sources.reasoning.size": 50, "data.sources.grounding.size": 50,
    "data.sources.ocr.size": 50,
}


def load_config(name: str = "demo"):
    spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override(config, overrides: dict):
    for field, value in overrides.items():
        node = config
        *parents, last = field.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def short_config(**extra):
    """configs/demo.py with SHORT_RUN_OVERRIDES and ``extra`` ({"rl.method": "uniform"} style
    keys with dots replaced by "__": rl__method="uniform")."""
    overrides = dict(SHORT_RUN_OVERRIDES)
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return override(load_config("demo"), overrides)


def cli_overrides(overrides: dict | None = None) -> list[str]:
    overrides = dict(SHORT_RUN_OVERRIDES, **(overrides or {}))
    return [f"--config.{k}={v}" for k, v in overrides.items()]
