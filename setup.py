"""recap_jax: RLVR (GRPO) post-training of Qwen2.5-VL in JAX/Flax with RECAP replay reweighting.

Versions are pinned to one set that is known to work together on CPU (see
../shared/docs/design.md, "Environment facts"). GPU hosts may carry a newer jax; the code
stays compatible with jax 0.10 and 0.11.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "numpy>=1.26,<3",
    "pillow>=10",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    # transformers is used at run time only to load a checkpoint's tokenizer (no network).
    "transformers==5.23.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "math-verify>=0.7",
    "pyarrow>=15",
    "tensorboardX>=2.6",
    # transformers renders chat templates with jinja2 but does not require it.
    "jinja2>=3.1",
    # OCRBench v2's text metric (recap_jax.bench.ocrbench_v2_text): NLTK's Porter stemmer for
    # METEOR (its WordNet data is never downloaded) and jieba's word cutting for Chinese, as
    # the published evaluation does
    "nltk==3.10.4",
    "jieba==0.42.1",
    # the main job (recap_jax.demo) plots lambda and the rewards; 3.11 needs Python 3.11
    "matplotlib==3.11.2; python_version >= '3.11'",
    "matplotlib==3.10.9; python_version < '3.11'",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3",
    "hypothesis>=6.100",
    # The PyTorch reference for parity tests; 2.13.0 is the local CPU wheel. Never unpinned:
    # an open range pulls several GB of CUDA packages.
    "torch==2.13.0",
    "datasets==5.2.0",
    "nbformat>=5",
    "nbclient>=0.10",
    "ipykernel>=6",
    # independent references for our tree edit distance (recap_jax.bench.tree_edit): zss is
    # what OCRBench v2's STEDS runs, apted what its TEDS runs
    "zss==1.2.0",
    "apted==1.0.3",
    # the linter .ci/run runs (configuration: ruff.toml)
    "ruff==0.14.9",
]

setup(
    name="recap_jax",
    version="0.1.0",
    description="RECAP: replay-enhanced, capability-preserving RLVR for Qwen2.5-VL in JAX/Flax",
    packages=find_packages(include=["recap_jax", "recap_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
