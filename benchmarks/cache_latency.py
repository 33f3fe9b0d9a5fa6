"""CPU latency of a cached step vs a full step with block caching, against its MAC ratio.

    python benchmarks/cache_latency.py                          # DiT-XL/2 (random weights), CPU, batch 1
    python benchmarks/cache_latency.py --branches 2 14 --batch-size 2 --repeats 5

A step is one denoiser forward on the CFG batch (2 × batch size). With `BlockCache(interval=2,
branch=b)` the steps alternate: a full step runs all N blocks and stores the residual of blocks
[b, N); a cached step runs blocks [0, b), adds the residual and runs the output layers. MACs are
counted by `dp.count_macs` with the cache active (`caching.step_macs`), so they are the MACs of
what actually runs. Times are medians of `--repeats` (perf_counter) after `--warmup` rounds; the latency ratio is the
median over rounds of (cached step / the full step timed just before it).
Writes benchmarks/results/cache_latency_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import diffes_pl as dp
from diffes_pl.caching import BlockCache, step_macs


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/DiT-XL-2-256")
    parser.add_argument("--branches", type=int, nargs="+", default=[4, 14, 24])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_latency_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adapter = dp.load_denoiser(args.model, weights=False)
    batch = 2 * args.batch_size  # the CFG batch
    latents = torch.randn(batch, *adapter.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500.0)
    cond = adapter.example_condition(batch)

    def forward() -> None:
        with torch.no_grad():
            adapter.predict_noise(latents, t, cond)

    rows = []
    for b in args.branches:
        with BlockCache(adapter, intervals=2, branch=b) as cache:
            full_macs, cached_macs = step_macs(adapter, cache, batch_size=batch)
            full_t, cached_t = [], []
            for _ in range(args.warmup + args.repeats):
                cache.on_step(0, 0)
                full_t.append(timed(forward))
                cache.on_step(1, 0)
                cached_t.append(timed(forward))
            cache.clear()
        full_t, cached_t = full_t[args.warmup:], cached_t[args.warmup:]
        full, cached = statistics.median(full_t), statistics.median(cached_t)
        # each cached step is timed right after its full step: the median of those pairs' ratios
        # is steadier than a ratio of medians on a shared, busy machine
        ratio = statistics.median(c / f for c, f in zip(cached_t, full_t))
        row = {"branch": b, "blocks": len(adapter.blocks()), "full_s": full, "cached_s": cached,
               "full_s_all": full_t, "cached_s_all": cached_t, "latency_ratio": ratio,
               "full_gmacs": full_macs / 1e9, "cached_gmacs": cached_macs / 1e9, "mac_ratio": cached_macs / full_macs}
        row["latency_over_mac_ratio"] = row["latency_ratio"] / row["mac_ratio"]
        rows.append(row)
        print(f"b={b:2d}: full {full:.3f} s ({full_macs / 1e9:.1f} GMACs), cached {cached:.3f} s "
              f"({cached_macs / 1e9:.1f} GMACs): latency ratio {row['latency_ratio']:.3f}, MAC ratio "
              f"{row['mac_ratio']:.3f}, latency/MAC {row['latency_over_mac_ratio']:.2f}", flush=True)
    result = {"model": args.model, "weights": "random", "device": "cpu", "threads": args.threads,
              "cfg_batch": batch, "warmup": args.warmup, "repeats": args.repeats,
              "dense_gmacs": dp.count_macs(adapter, batch) / 1e9, "branches": rows,
              "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)  # atomic
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
