"""The paper's hybrid setting (recap-method.md): Qwen2.5-VL-7B, reasoning RL on ThinkLite-VL-70k
with grounding replay (RefCOCO/+/g, RL: iou + format_answer) and OCR replay (LLaVA-OneVision OCR
subsets, SFT), K = 5 objectives, RECAP weights. Point it at local copies:

    python -m recap_jax.train --config configs/hybrid_7b.py --workdir /ckpt/recap_hybrid_7b \
      --config.model.path=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.sources.thinklite.train=/data/thinklite/train.parquet \
      --config.data.sources.refcoco.train=/data/rec_jsons_processed/refcoco_train.jsonl \
      --config.data.sources.refcoco.image_root=/data/coco/train2014 \
      --config.data.sources.ocr_llava.train=/data/llava_ov_ocr/part-0.parquet,/data/llava_ov_ocr/part-1.parquet

Baselines: --config.rl.method=reasoning_only | uniform | propmix | coreset | lwf; the paper's
Eq. 1 variant: --config.recap.variant=paper --config.rl.weighting=loss. Held-out files
(--config.data.sources.<name>.eval=...) enable periodic evaluation.
"""

import ml_collections

from recap_jax.run_config import base_config, source_config


def get_config():
    c = base_config()
    c.model.update(path="", require_path=True, param_dtype="bfloat16", compute_dtype="bfloat16",
                   remat="full")
    # EasyR1-style pixel budget: up to 1280 merged tokens per image
    c.tokenizer.update(min_pixels=3136, max_pixels=1280 * 28 * 28)
    c.mesh.spec = "fsdp=-1"  # shard params and optimizer over every device
    c.data.sources = ml_collections.ConfigDict({
        "thinklite": source_config("thinklite"),
        "refcoco": source_config("refcoco"),
        "ocr_llava": source_config("ocr_llava"),
    })
    c.data.primary = "thinklite"
    c.data.prompt_buckets = (512, 1024, 2048, 4096)
    c.data.answer_buckets = (64, 256, 1024)
    c.data.patch_buckets = (1024, 4096, 16384)
    c.sft.steps = 0  # an instruct model needs no warm-start
    c.rl.update(steps=500, method="recap", prompts_per_step=16, group_size=4,
                max_new_tokens=2048, temperature=0.9, learning_rate=1e-6, warmup_fraction=0.1,
                weighting="reward", loss_aggregation="token-mean")
    c.recap.update(variant="released", window=10, temperature=5.0, alpha=0.5)
    c.checkpoint.update(every_steps=50, keep=3)
    c.eval.update(every_steps=100, num_examples=500, batch_size=16, max_new_tokens=2048)
    return c
