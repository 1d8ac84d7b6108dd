"""The paper's hybrid setting (recap-method.md): Qwen2.5-VL-7B, reasoning RL on ThinkLite-VL-70k
with grounding replay (RefCOCO/+/g, RL: iou + format_answer) and OCR replay (LLaVA-OneVision OCR
subsets, SFT), K = 5 objectives, RECAP weights. Point it at local copies:

    python -m recap_jax.train --config configs/hybrid_7b.py --workdir /ckpt/recap_hybrid_7b \
      --config.model.path=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.sources.thinklite.train=/data/thinklite/train.parquet \
      --config.data.sources.refcoco.train=/data/rec_jsons_processed/refcoco_train.jsonl \
      --config.data.sources.refcoco.image_root=/data/coco/train2014 \
      --config.data.sources.ocr_llava.train=/data/llava_ov_ocr/part-0.parquet,/data/llava_ov_ocr/part-1.parquet

Baselines: --config.rl.method=reasoning_only | uniform | propmix | coreset | lwf, and the
released coreset: --config.rl.method=coreset_released with an OCR shard built by
scripts/build_ocr_replay.py --max-rows-per-config 5000; the paper's Eq. 1 variant:
--config.recap.variant=paper --config.rl.weighting=loss. Our own prompts and rewards instead
of the released code's: --config.data.prompt_style=bare (docs/fidelity.md). Held-out files
(--config.data.sources.<name>.eval=...) enable periodic evaluation.
"""

import ml_collections

from recap_jax.run_config import base_config, source_config


def get_config():
    c = base_config()
    c.model.update(path="", require_path=True, param_dtype="bfloat16", compute_dtype="bfloat16",
                   remat="full")
    # the released code's image budget: 401,408 pixels (512 merged tokens per image)
    c.tokenizer.update(min_pixels=3136, max_pixels=401408)
    c.mesh.spec = "fsdp=-1"  # shard params and optimizer over every device
    c.data.sources = ml_collections.ConfigDict({
        "thinklite": source_config("thinklite"),
        "refcoco": source_config("refcoco"),
        "ocr_llava": source_config("ocr_llava"),
    })
    c.data.primary = "thinklite"
    # the released code's prompts, rewards and OCR replay (question + instruction, target in
    # <answer> tags, loss on the whole turn after the image): docs/fidelity.md
    c.data.prompt_style = "released"
    c.data.prompt_buckets = (512, 1024, 2048, 4096)
    c.data.answer_buckets = (64, 256, 1024, 2048)  # OCR's conversation loss trains the question too
    c.data.patch_buckets = (1024, 4096, 16384)
    c.sft.steps = 0  # an instruct model needs no warm-start
    # 500 optimizer steps, each the average of two consecutive single-source batches (the
    # released gradient accumulation 2): 1,000 batches; trainer log-probs at T = 0.9 (as TRL)
    c.rl.update(steps=1000, sources_per_update=2, method="recap", prompts_per_step=16,
                group_size=4, max_new_tokens=2048, temperature=0.9, scale_logprobs=True,
                learning_rate=1e-6, warmup_fraction=0.1, weighting="reward",
                loss_aggregation="token-mean")
    c.recap.update(variant="released", window=10, temperature=5.0, alpha=0.5)
    c.checkpoint.update(every_steps=50, keep=3)
    c.eval.update(every_steps=100, num_examples=500, batch_size=16, max_new_tokens=2048)
    return c
