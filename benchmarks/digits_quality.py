"""Quality bar of the built-in model: dense samples (20 DDIM steps, CFG) read as their conditioning
label by the independent digits classifier, and digits-FID against real digits held out from training.

    python benchmarks/digits_quality.py            # ~1 minute on 2 CPU cores

Prints a table and writes benchmarks/results/digits_quality.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffes_pl as dp
from diffes_pl.data.digits import load_digits_split
from diffes_pl.evaluation.digits_features import class_accuracy, digits_fid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100, help="samples per digit class")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "digits_quality.json"))
    args = parser.parse_args()

    adapter = dp.load_denoiser("tiny-digits")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    held_out, held_labels = load_digits_split("test")
    train, _ = load_digits_split("train")
    real_test = (held_out + 1) / 2
    rows = {"real train vs held-out (floor)": {"class_accuracy": class_accuracy(real_test, held_labels),
                                                "digits_fid": digits_fid((train + 1) / 2, real_test)}}
    for g in args.guidance:
        images = dp.sample(adapter, labels, steps=args.steps, guidance=g, seed=args.seed, batch_size=250)
        rows[f"dense, {args.steps} DDIM steps, CFG {g:g}"] = {
            "class_accuracy": class_accuracy(images, labels), "digits_fid": digits_fid(images, real_test)}
    print(f"{'':45s} {'class acc':>10s} {'digits-FID':>11s}")
    for name, r in rows.items():
        print(f"{name:45s} {100 * r['class_accuracy']:9.1f}% {r['digits_fid']:11.3f}")
    out = {"samples": len(labels), "held_out_real": len(held_out), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
