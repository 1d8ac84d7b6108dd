"""Test-wide settings: 8 simulated CPU devices (for the sharding tests), quiet TensorFlow,
and a deterministic hypothesis profile sized for a 2-core CI machine."""

import os

# Must be set before jax is imported anywhere.
# 8 simulated devices share 2 cores: XLA's CPU collectives abort the process when one of the
# 8 device threads reaches an all-reduce more than 40 s after the first (its default)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """(workdir, final params, config) of one short demo run (tests/short_run.py), trained
    once per test worker and shared by the end-to-end tests (group them with
    @pytest.mark.xdist_group("short_run") so one worker runs them all)."""
    from recap_jax import train
    from tests.short_run import short_config

    config = short_config()
    workdir = tmp_path_factory.mktemp("short_run")
    params = train.train(config, str(workdir))
    return workdir, params, config


def pytest_addoption(parser):
    parser.addoption("--all-rehearsals", action="store_true",
                     help="also run the rehearsals outside CI's subset (tests/test_rehearsal_runs.py)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all-rehearsals"):
        return
    skip = pytest.mark.skip(reason="a rehearsal outside CI's subset: run with --all-rehearsals")
    for item in items:
        if "all_rehearsals" in item.keywords:
            item.add_marker(skip)
