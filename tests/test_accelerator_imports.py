"""The accelerator path imports without TensorFlow or ml_collections (the GPU machines have
neither): each module is imported in a fresh interpreter whose import system refuses both.

A module that reaches them, directly or through another module, fails here with the chain
in the subprocess's traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("tensorflow", "tensorflow_datasets", "ml_collections")

_PROGRAM = textwrap.dedent("""
    import importlib, sys

    BLOCKED = {blocked!r}

    class Refuse:
        '''A meta-path finder that makes importing the blocked packages an ImportError.'''

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the accelerator path must not import it")
            return None

    sys.meta_path.insert(0, Refuse())
    importlib.import_module({module!r})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("ok")
""")

MODULES = [
    "recap_jax.models.qwen2_5_vl.model",
    "recap_jax.models.qwen2_5_vl.checkpoint",
    "recap_jax.models.qwen2_5_vl.attention",
    "recap_jax.sampling",
    "recap_jax.grpo",
    "recap_jax.train_step",
    "recap_jax.train_state",
    "recap_jax.recap",
    "recap_jax.parallel",
    "benchmarks.accelerator",
]


def _import_blocked(module: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", _PROGRAM.format(blocked=BLOCKED, module=module)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    """The check can fail: a module that imports ml_collections is refused."""
    result = _import_blocked("ml_collections")
    assert result.returncode != 0 and "blocked" in result.stderr


@pytest.mark.parametrize("module", MODULES)
def test_imports_without_tensorflow_or_ml_collections(module):
    result = _import_blocked(module)
    assert result.returncode == 0, f"{module} needs a blocked package:\n{result.stderr[-3000:]}"
