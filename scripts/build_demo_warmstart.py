#!/usr/bin/env python
"""Rebuilds the warm-start the main job starts from (assets/demo_warmstart) and its checksums.

    python scripts/build_demo_warmstart.py --workdir /tmp/demo_warmstart_build

Two SFT stages of `recap_jax.train` on configs/demo.py (settings in recap_jax.demo_settings):
OCR alone for 800 steps into WORKDIR/ocr_first, then the mixed SFT for 1500 steps from that
model into WORKDIR/mixed. The mixed stage's policy (WORKDIR/mixed/warmstart: safetensors,
config.json, tokenizer files) is copied to --out and a SHA256SUMS manifest is written beside
it, which `recap_jax.demo` checks before it loads anything. About 15 min on 2 free CPU cores
(the stored one took 18 + 52 min on a busy shared machine); rerunning resumes each stage from
its checkpoints. The result is not bitwise the same on
another machine (floating-point reductions differ), hence the manifest is rewritten.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys
import time

from recap_jax import demo_settings, train
from recap_jax.demo import write_manifest


def build(workdir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Runs both stages in ``workdir`` and copies the policy to ``out``; returns ``out``."""
    began = time.perf_counter()
    first = workdir / "ocr_first"
    train.train(demo_settings.demo_config(demo_settings.OCR_FIRST), str(first))
    print(f"stage 1 (OCR alone) done after {time.perf_counter() - began:.0f} s", flush=True)
    stage1 = str(first / "warmstart")
    mixed = workdir / "mixed"
    train.train(demo_settings.demo_config(
        demo_settings.MIXED, {"model.path": stage1, "tokenizer.path": stage1}), str(mixed))
    print(f"stage 2 (mixed) done after {time.perf_counter() - began:.0f} s", flush=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(mixed / "warmstart", out)
    manifest = write_manifest(out)
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB) and "
          f"{manifest}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path,
                        help="where both stages run (outside the repository)")
    parser.add_argument("--out", type=pathlib.Path, default=demo_settings.WARMSTART_DIR,
                        help="where the policy and its manifest go (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    build(args.workdir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
