"""A small end-to-end example on CPU: build a tiny random Qwen2.5-VL checkpoint directory (a
demo tokenizer, config.json, safetensors), load it back with `from_pretrained`, process an
image prompt, run the forward pass and sample completions with the KV-cache sampler.

    python -m recap_jax.tools.tiny_example --workdir /tmp/recap_tiny

The weights are random, so the completions are gibberish: the example shows the pipeline
and its speed, not a trained model.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

from recap_jax import sampling
from recap_jax.models import qwen2_5_vl as qwen
from recap_jax.models.qwen2_5_vl import processor as proc

CORPUS = [
    "How many red circles are in the image? <think> I count the circles. </think> <answer> 3 </answer>",
    "Locate the blue square. Output the final answer in <answer> </answer> tags. <answer> [10, 20, 50, 60] </answer>",
    "Read the text in the image. <answer> HELLO </answer> The quick brown fox jumps over the lazy dog.",
]


def draw_example_image(size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 40, 40), fill="red")
    draw.rectangle((60, 50, 100, 90), fill="blue")
    return image


def build_checkpoint(workdir: str, vocab_size: int = 400, seed: int = 0) -> str:
    """A tokenizer and a random tiny model saved as a Hugging Face directory."""
    path = os.path.join(workdir, "tiny_qwen2_5_vl")
    proc.build_demo_tokenizer(CORPUS, vocab_size, path)
    config = qwen.tiny(vocab_size=vocab_size, vision_depth=2, fullatt_block_indexes=(1,))
    qwen.save_pretrained(qwen.init_model(config, seed=seed), path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the tiny checkpoint directory is written")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    path = build_checkpoint(args.workdir)
    model = qwen.from_pretrained(path)
    processor = proc.Qwen2_5_VLProcessor.from_pretrained(path, max_pixels=112 * 112)
    print(f"checkpoint: {path} ({sum(x.size for x in jax.tree.leaves(model)):,} parameters)")

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[[draw_example_image()]])
    logits = np.asarray(model(**batch))
    print(f"prompt: {batch['input_ids'].shape[1]} tokens, image grid {batch['image_grid_thw'].tolist()}, "
          f"logits {logits.shape}, finite: {bool(np.isfinite(logits).all())}")

    out = sampling.generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["image_grid_thw"], max_new_tokens=args.max_new_tokens, temperature=1.0,
                            top_p=0.95, eos_token_id=model.config.eos_token_id, num_samples=args.samples,
                            rng=jax.random.key(0))
    for g, (tokens, length) in enumerate(zip(np.asarray(out.tokens), np.asarray(out.lengths))):
        text = processor.tokenizer.decode(tokens[:length].tolist())
        print(f"sample {g}: {length:2d} tokens, sum log-prob {float(np.asarray(out.logprobs)[g].sum()):7.2f}: {text!r}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
