"""Benchmark: structured OBS ``mode="fast"`` vs ``mode="exact"`` on one MLP-like layer.

The layer is ``W: [rows, cols]`` (random normal) with ``group_size=1`` (MLP channels); the Hessian is
``H = X Xᵀ`` with ``X = A Z`` of shape ``[cols, samples]`` (``A``, ``Z`` random normal, so the input
columns are correlated). Both modes are timed end to end (inverse of the damped Hessian included),
each once, on the same inputs; the reconstruction error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (damped ``H``) is
measured independently at every milestone.

    python benchmarks/obs_fast_vs_exact.py                       # 1152×4608, 6000 samples
    python benchmarks/obs_fast_vs_exact.py --rows 256 --cols 1024 --samples 1500 --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffes_pl.pruners.obs_solver import damp_hessian, prune_groups


def measured_error(W: torch.Tensor, H: torch.Tensor, res) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``Ŵ`` the result's weight put back at its kept columns."""
    full = torch.zeros_like(W)  # [out, in]
    full[:, res.kept] = res.weight.to(W.dtype)
    D = W - full
    return float(((D @ H) * D).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1152, help="output features of the layer")
    ap.add_argument("--cols", type=int, default=4608, help="input features (groups of 1 column)")
    ap.add_argument("--samples", type=int, default=6000, help="calibration inputs in X")
    ap.add_argument("--steps", type=int, default=16, help="milestones: cols*L/steps for L = 1..steps")
    ap.add_argument("--block-groups", type=int, default=32, help="fast mode: steps between flushes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "obs_fast_vs_exact.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    A = torch.randn(args.cols, args.cols) / args.cols**0.5
    X = A @ torch.randn(args.cols, args.samples)  # [cols, samples], correlated columns
    H = X.double() @ X.double().T  # [cols, cols]
    W = torch.randn(args.rows, args.cols, dtype=torch.float64)  # [rows, cols]; float64 weights come back
    milestones = sorted({args.cols * L // args.steps for L in range(1, args.steps + 1)})

    runs, seconds = {}, {}
    for mode in ("fast", "exact"):
        t = time.perf_counter()
        runs[mode] = prune_groups(W, H, 1, milestones, mode=mode, block_groups=args.block_groups)
        seconds[mode] = time.perf_counter() - t
        print(f"{mode}: {seconds[mode]:.1f} s", flush=True)

    Hd, _ = damp_hessian(H, 0.01)
    per = []
    for m, e, f in zip(milestones, runs["exact"], runs["fast"]):
        me, mf = measured_error(W, Hd, e), measured_error(W, Hd, f)
        per.append({"removed": m, "exact_error": me, "fast_error": mf,
                    "rel_diff": abs(mf - me) / me, "exact_reported": e.error, "fast_reported": f.error})
        print(f"m={m:5d}  exact {me:.6e}  fast {mf:.6e}  rel diff {per[-1]['rel_diff']:.2e}")
    oe, of = runs["exact"][-1].removed, runs["fast"][-1].removed
    same = int((oe != of).nonzero()[0, 0]) if (oe != of).any() else len(oe)
    result = {
        "layer": {"rows": args.rows, "cols": args.cols, "group_size": 1, "samples": args.samples},
        "milestones": milestones,
        "dtype": "float64", "damp": 0.01, "block_groups": args.block_groups,
        "exact_seconds": seconds["exact"], "fast_seconds": seconds["fast"],
        "speed_ratio": seconds["exact"] / seconds["fast"],
        "max_rel_error_diff": max(p["rel_diff"] for p in per),
        "removal_order_common_prefix": same,
        "per_milestone": per,
        "measured": "each mode once, full run to the last milestone, inverse of the damped Hessian included",
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "cpu": platform.processor(), "load_average_at_end": os.getloadavg()},
    }
    print(f"speed ratio {result['speed_ratio']:.2f}×, max rel error diff {result['max_rel_error_diff']:.2e}, "
          f"same removal order for the first {same} of {len(oe)} steps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
