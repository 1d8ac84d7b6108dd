"""Data for RLVR with replay: task registry, synthetic suite, real sources, replay buffer.

Modules (none imports tensorflow at import time except ``synthetic_tfds``):
  tasks           Task registry, objective names (``<source>/<reward>``, ``<source>/ntp``).
  records         Record (the one example type), SkipCounter, image decoding.
  synthetic       offline generated reasoning / grounding / ocr tasks (plain python).
  synthetic_tfds  the same as a tfds builder, built and read offline.
  sources         real datasets from disk (ThinkLite, RefCOCO, LLaVA-OV OCR, LISA, ...);
                  files: jsonl/parquet reading, lazy parquet images, path confinement.
  encode          Record -> model arrays (processor, M-RoPE), collation into padded batches.
  replay          tf.data replay pipelines and mixing strategies (imports tf lazily).
  render          flat shapes and a 5x7 bitmap font for the synthetic suite.
"""

from recap_jax.data.records import BadRecord, Record, SkipCounter
from recap_jax.data.tasks import TASKS, Task, get_task, objective_names, register_task

__all__ = ["BadRecord", "Record", "SkipCounter", "TASKS", "Task", "get_task",
           "objective_names", "register_task"]
