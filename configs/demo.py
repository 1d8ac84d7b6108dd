"""The CPU demo: a tiny Qwen2.5-VL-architecture model learns the synthetic suite from scratch
(SFT warm-start), then RLVR on reasoning with grounding (RL) and OCR (SFT) replay, weighted
online by RECAP. Runs in minutes on 2 CPU cores (figures in benchmarks/RESULTS.md). Its
single-stage warm-start does not learn to use the images; the main job (`python -m
recap_jax.demo`, README) starts from a two-stage warm-start of this model that does
(recap_jax/demo_settings.py has its overrides of this file).

    python -m recap_jax.train --config configs/demo.py --workdir /tmp/recap_demo
    python -m recap_jax.train --config configs/demo.py --workdir DIR --config.rl.method=uniform
"""

import ml_collections

from recap_jax.run_config import base_config, source_config


def get_config():
    c = base_config()
    c.model.update(preset="tiny", vocab_size=512, hidden_size=128, intermediate_size=256,
                   text_layers=2, heads=4, kv_heads=2, vision_depth=2, vision_hidden_size=64,
                   rope_theta=3.0)
    # rope_theta: with head_dim 32 and mrope_section (4, 6, 6), the height and width sections
    # get the lowest frequencies theta^(-2j/32); at Qwen's 1e4 they turn by < 0.1 rad per
    # merged-patch cell, so the tiny decoder cannot tell image columns apart and never learns
    # to read the grid OCR images (char F1 0.17 after 600 OCR-only SFT steps). At 3 it reads
    # them exactly (char F1 1.00); experiments/forgetting_in_miniature/README.md has the table.
    c.data.sources = ml_collections.ConfigDict({
        "reasoning": source_config("synthetic", size=4000, eval_size=64),
        "grounding": source_config("synthetic", size=4000, eval_size=64),
        "ocr": source_config("synthetic", size=4000, eval_size=64),
    })
    c.data.primary = "reasoning"
    c.data.prompt_buckets = (128, 256)
    c.data.answer_buckets = (16, 32)
    c.data.patch_buckets = (64,)
    c.sft.update(steps=300, batch_size=32, learning_rate=2e-3, warmup_fraction=0.05)
    c.rl.update(steps=60, method="recap", prompts_per_step=8, group_size=4, max_new_tokens=24,
                temperature=1.0, learning_rate=2e-5, warmup_fraction=0.1,
                log_lambda_effect=True)  # the demo shows what lambda changes in each update
    c.checkpoint.update(every_steps=20, keep=2)
    c.eval.update(every_steps=0, num_examples=64, batch_size=32, max_new_tokens=24)
    c.log.every_steps = 10
    return c
