"""recap_jax: RLVR (GRPO) post-training of Qwen2.5-VL in JAX/Flax with RECAP replay reweighting.

Subpackages are imported on use (``import recap_jax.recap``, ``recap_jax.models.qwen2_5_vl``)
so that light modules (rewards, RECAP) do not pay for TensorFlow or the model at import.
"""

__version__ = "0.1.0"
