"""Benchmark: the OBS solve of one DiT-XL/2-sized block, on 1 thread vs every CPU (issue 24, part 5).

One DiT-XL/2 block has two pruned groups (DESIGN: unit groups): the attention output layer
(`attn1.to_out.0`, [1152, 1152], 16 heads of 72 columns) and the MLP output layer (`ff.net.2`,
[1152, 4608], 4608 channels of 1 column). Their Hessians are random SPD statistics with correlated
columns (H = X Xᵀ, X = A Z, as benchmarks/obs_fast_vs_exact.py), the milestones those of H = 16
levels, `mode="fast"`, float64 — what `OBSPruner` solves per block and stage. The block is solved
with torch on 1 thread (what Lightning's DDP launcher leaves each of 2 ranks on 2 CPUs, or
OMP_NUM_THREADS=1) and then on all the process's CPUs (what `obs_solver.solve_threads` gives rank 0
when it solves alone), in one run on the same inputs; results must be identical in order.

    python benchmarks/obs_block_solve.py                       # DiT-XL/2 block
    python benchmarks/obs_block_solve.py --hidden 384 --out /tmp/b.json   # a quick small run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffes_pl.pruners.obs_solver import available_cpus, prune_groups
from diffes_pl.schedule import units_removed


def spd(n: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    X = A @ torch.randn(n, samples, generator=gen, dtype=torch.float64)  # [n, samples], correlated columns
    return X @ X.T  # [n, n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1152, help="model width (DiT-XL/2: 1152)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (DiT-XL/2: 16)")
    ap.add_argument("--mlp-ratio", type=int, default=4, help="MLP width / hidden (DiT-XL/2: 4)")
    ap.add_argument("--levels", type=int, default=16, help="H: milestones at levels 1..H")
    ap.add_argument("--samples", type=int, default=2048, help="calibration rows in X")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "obs_block_solve_cpu.json")
    args = ap.parse_args()

    load_start = os.getloadavg()  # other jobs on the machine take cores the second thread would need
    gen = torch.Generator().manual_seed(args.seed)
    d, m = args.hidden, args.hidden * args.mlp_ratio
    groups = {  # name: (weight [out, in], Hessian [in, in], unit width)
        "attn1": (torch.randn(d, d, generator=gen), spd(d, args.samples, gen), d // args.heads),
        "ff": (torch.randn(d, m, generator=gen), spd(m, args.samples, gen), 1),
    }
    dtype = getattr(torch, args.dtype)
    before = torch.get_num_threads()
    cpus = available_cpus()
    runs: dict[int, dict] = {}
    for threads in sorted({1, cpus}):
        torch.set_num_threads(threads)
        seconds, orders = {}, {}
        for name, (W, H, g) in groups.items():
            n = W.shape[1] // g
            milestones = [units_removed(L, args.levels, n) for L in range(1, args.levels + 1)]
            t = time.perf_counter()
            res = prune_groups(W, H, g, milestones, dtype=dtype, mode="fast")
            seconds[name] = time.perf_counter() - t
            orders[name] = res[-1].removed
            print(f"threads {threads}: {name} [{W.shape[0]}, {W.shape[1]}] g={g}: {seconds[name]:.1f} s", flush=True)
        runs[threads] = {"seconds": seconds, "block_seconds": sum(seconds.values()), "orders": orders}
    torch.set_num_threads(before)

    one, many = runs[1], runs[cpus]
    same = all(torch.equal(one["orders"][k], many["orders"][k]) for k in groups)
    result = {
        "block": {"hidden": d, "heads": args.heads, "mlp": m, "levels": args.levels, "samples": args.samples},
        "dtype": args.dtype, "mode": "fast", "damp": 0.01,
        "seconds_1_thread": one["seconds"], "block_seconds_1_thread": one["block_seconds"],
        f"seconds_{cpus}_threads": many["seconds"], f"block_seconds_{cpus}_threads": many["block_seconds"],
        "speedup_all_cpus_vs_1_thread": one["block_seconds"] / many["block_seconds"],
        "same_removal_orders": same,
        "dit_xl_2_stage_estimate_s": {"1_thread": 28 * one["block_seconds"], f"{cpus}_threads": 28 * many["block_seconds"]},
        "measured": "each setting once, in one process, on the same inputs; inverse of the damped Hessian included",
        "machine": {"torch": torch.__version__, "cpus": cpus, "cpu": platform.processor(),
                    "note": "CPU, shared/loaded machine (other jobs running)",
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
    }
    print(f"block: 1 thread {one['block_seconds']:.1f} s, {cpus} threads {many['block_seconds']:.1f} s, "
          f"speedup {result['speedup_all_cpus_vs_1_thread']:.2f}×; same orders: {same}; "
          f"DiT-XL/2 stage (28 blocks) ≈ {28 * one['block_seconds'] / 60:.1f} min (1 thread), "
          f"{28 * many['block_seconds'] / 60:.1f} min ({cpus} threads)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
