"""Public benchmarks read from local copies and scored by their published rules, so that a
run's forgetting can be measured the way the paper does (issue 23).

- `suites`: adapters that turn each benchmark's published files (Hugging Face parquet/arrow,
  ``save_to_disk`` directories, the ``datasets`` cache, VLM-R1 json) into `BenchItem`s.
- `scoring`: each suite's scoring rule (option letters, math-verify, relaxed accuracy, ANLS,
  VQA soft accuracy, OCRBench containment, IoU >= 0.5).
- `prompts`: the paper's thinking / non-thinking evaluation prompts.

`recap_jax.benchmarks_eval` runs a checkpoint on them.
"""
