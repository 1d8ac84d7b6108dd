"""The optional Weights & Biases writer of MetricsLog: the wandb calls it makes (a recording
stand-in for the wandb module), the clear error without wandb, config validation, and a
real offline run when wandb is installed."""

import glob
import json
import os
import sys
import types

import pytest

from recap_jax.metrics_log import MetricsLog, WandbConfig


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, record):
        self.calls.append(("log", record))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_records_go_to_wandb_per_stage_step_axis(tmp_path, fake_wandb):
    config = WandbConfig(enabled=True, project="proj", run_name="run1", mode="offline")
    log = MetricsLog(str(tmp_path), tensorboard=False, wandb=config)
    log.write("sft", 1, {"loss": 1.5, "skipped": True, "objective_weight": [1.0, 2.0], "note": "x"})
    log.write("rl", 1, {"loss": 0.25, "tokens": 7})
    log.write("rl", 2, {"loss": 0.5})
    log.close()
    init = fake_wandb[0]
    assert init[0] == "init"
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert init[1] == dict(project="proj", name="run1", entity=None, mode="offline",
                           dir=str(tmp_path), id=run_id, resume="allow")
    assert fake_wandb[1:] == [
        ("define_metric", "sft/step", None), ("define_metric", "sft/*", "sft/step"),
        ("log", {"sft/loss": 1.5, "sft/step": 1}),
        ("define_metric", "rl/step", None), ("define_metric", "rl/*", "rl/step"),
        ("log", {"rl/loss": 0.25, "rl/tokens": 7, "rl/step": 1}),
        ("log", {"rl/loss": 0.5, "rl/step": 2}), ("finish",)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # JSONL unchanged
    MetricsLog(str(tmp_path), tensorboard=False, wandb=config)  # a resumed run: same wandb run
    assert fake_wandb[-1][1]["id"] == run_id


def test_off_by_default_and_a_clear_error_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    log = MetricsLog(str(tmp_path), tensorboard=False)
    log.write("rl", 1, {"loss": 1.0})
    log.close()
    MetricsLog(str(tmp_path), tensorboard=False, wandb=WandbConfig())  # enabled=False
    with pytest.raises(ImportError, match="log.wandb=True but the 'wandb' package is not installed"):
        MetricsLog(str(tmp_path), tensorboard=False, wandb=WandbConfig(enabled=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="cloud"), r"log\.wandb_mode='cloud'.*online \| offline \| disabled"),
    (dict(enabled=True, project=""), r"log\.wandb_project=''"),
    (dict(enabled="yes"), r"log\.wandb='yes'"), (dict(run_name=3), r"log\.wandb_run_name=3"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WandbConfig(**kwargs)


def test_real_wandb_offline_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")
    log = MetricsLog(str(tmp_path), tensorboard=False,
                     wandb=WandbConfig(enabled=True, project="p", mode="offline"))
    for step in (1, 2):
        log.write("rl", step, {"loss": 1.0 / step})
    log.close()
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
