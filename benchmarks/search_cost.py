"""What the search costs, and what racing and stopping when converged save (issue 14).

    python benchmarks/search_cost.py                    # built-in model, 100 generations, three searches (~25 min, 2 cores)
    python benchmarks/search_cost.py --tiny             # smoke run: proves the script works; numbers meaningless
    python benchmarks/search_cost.py --device cuda      # + the DiT-XL/2 search timed directly on the GPU

Rows (the default search of `configs/tiny_obs.yaml` — OBS 50 %, 10 stages of 2 steps, 16 + 4
individuals, 64 probes — for `--generations` generations, all on one shared store):
- default: every child scored on all 64 probes (today's search);
- racing (`--variants m,z,patience`): children scored on the first m probes first, finished only if
  they can still reach the worst survivor (confidence z; `search/racing.py`); m = 8/16 races in rungs
  (8 probes, then 16, then all; a child must pass at every rung); with patience > 0 also
  stopping when converged: after `patience` generations without an improvement of the best fitness
  by more than `--delta`.
Cost is the runs' own meter (schedule.json `extra.cost`: probe-steps — one probe through one
denoiser step, the CFG pair once — and denoiser MACs, the dense reference rollout included). Quality:
each final schedule scored on `--eval-probes` probes no search saw (another seed): SSIM and PSNR vs
dense, class accuracy, digits-FID.

Projection to DiT-XL/2 (OBS 50 %, the paper's search: 100 generations, 64 probes, 20 steps, 16 + 4):
the search's work in probe-steps is taken from the built-in model's run with the same settings (same
population, probes, steps and budget, so the same counts of evaluations and reused prefixes — an
assumption), each weighted by the MAC fraction of the steps it ran (measured: `macs / (probe_steps ·
dense step MACs · 2)`); one probe-step of DiT-XL/2 costs what a dense CFG step at batch
`--dit-batch` costs, divided by that batch (measured here, random weights; routed steps cost their MAC
fraction — measured in benchmarks/RESULTS.md: 99–101 % of the MAC ratio). Not counted: the VAE
decode and the fitness metric (once per evaluated schedule), store loading. With `--device cuda`
the script also runs `--dit-generations` generations of the real search on DiT-XL/2 with random
weights and a random store (SSIM fitness) and times them.
Writes benchmarks/results/search_cost.json (`--tiny`: search_cost_tiny.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _runs import TINY, fit, load_run

ROOT = Path(__file__).resolve().parents[1]
PAPER_HOURS = 17.3  # DiT OBS 50 %, 100 generations, one L40S (paper)


def dit_step_seconds(device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    """Median time of one dense DiT-XL/2 denoiser step on the CFG batch (2 × batch), random weights."""
    import diffes_pl as dp
    from latency import timer

    adapter = dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device=device, dtype=dtype)
    x = torch.randn(2 * batch, *adapter.latent_shape, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500, device=device)
    y = adapter.example_condition(2 * batch, device)
    run = timer(device)
    with torch.no_grad():
        step = lambda: adapter.predict_noise(x, t, y)  # noqa: E731
        run(step, 1)
        seconds = statistics.median(run(step, repeats))
    return {"batch": batch, "step_s": seconds, "probe_step_s": seconds / batch, "dense_step_macs": dp.count_macs(adapter)}


def dit_search_seconds(device: torch.device, dtype: torch.dtype, generations: int, race: tuple[int, float] | None,
                       probe_batch: int) -> dict:
    """Wall time of the real search on DiT-XL/2 (random weights, random OBS-like store, SSIM)."""
    import diffes_pl as dp
    from latency import random_store

    from diffes_pl.fitness import get_metric
    from diffes_pl.partition import StagePartition
    from diffes_pl.search.builder import level_space
    from diffes_pl.search.evolution import EvolutionarySearch
    from diffes_pl.search.racing import Racing
    from diffes_pl.search.rollouts import Probes, RolloutEngine

    adapter = dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device=device, dtype=dtype)
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim"), 20, 10)
    store = random_store(adapter, Path(tempfile.mkdtemp()) / "store", 16, 10)
    probes = Probes.make(adapter, 64, 1234)
    racing = None if race is None else Racing(*race)
    engine = RolloutEngine(adapter, store, partition, probes, sampler="ddim", guidance=2.1,
                           batch_size=probe_batch if racing is None else racing.batch_divisor(probe_batch))
    start = time.perf_counter()
    search = EvolutionarySearch(engine, get_metric("ssim"), space=level_space(adapter, store, partition, 8),
                                offspring=16, survivors=4, max_move=5, racing=racing)
    for _ in range(generations):
        search.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"generations": generations, "seconds": seconds, "cost": search.cost(),
            "hours_per_100_generations": seconds / generations * 100 / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_obs.yaml"))
    parser.add_argument("--runs", default=str(ROOT / "runs/search_cost"))
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=["16,1,0", "16,1,20", "8,1,10", "8,0.5,10", "8/16,1,10", "8/16,0.5,10"],
                        help="racing rows as race_probes,race_confidence,stop_patience (0: no stop)")
    parser.add_argument("--delta", type=float, default=1e-4, help="stop_delta of the rows that stop")
    parser.add_argument("--eval-probes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--device", default="cpu", help="where the DiT-XL/2 step (and with cuda, the search) is timed")
    parser.add_argument("--dtype", default=None, help="DiT-XL/2 dtype (default float32 on CPU, float16 on CUDA)")
    parser.add_argument("--dit-batch", type=int, default=4, help="probes per DiT-XL/2 step timed (CFG doubles it)")
    parser.add_argument("--dit-repeats", type=int, default=3)
    parser.add_argument("--dit-generations", type=int, default=100, help="with --device cuda: generations timed")
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 stages, 2 generations, 16 probes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.variants, args.dit_repeats, args.dit_batch = 2, 16, ["4,1,1"], 1, 1
    extra = [*TINY, "--model.pruner", "diffes_pl.pruners.WandaPruner", "--model.num_probes", "12"] if args.tiny else []
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"search_cost{'_tiny' if args.tiny else ''}.json")
    rows, slug = {"default": []}, {"default": "default"}
    for variant in args.variants:
        m, z, patience = variant.split(",")
        rungs = [int(r) for r in m.split("/")]  # 8/16: rungs (racing.Racing)
        name = (f"racing {m} probes first, z = {float(z):g}" if len(rungs) == 1 else
                f"racing in rungs {' → '.join(map(str, rungs))} probes, z = {float(z):g}")
        options = ["--model.race_probes", str(rungs[0] if len(rungs) == 1 else rungs), "--model.race_confidence",
                   str(float(z))]
        slug_ = f"race{'-'.join(map(str, rungs))}-z{float(z):g}"
        if int(patience):
            name += f" + stop when converged (patience {patience}, delta {args.delta:g})"
            options += ["--model.stop_patience", patience, "--model.stop_delta", str(args.delta)]
            slug_ += f"-stop{patience}"
        rows[name], slug[name] = options, slug_

    def common(name: str) -> list[str]:
        return ["--config", args.config, *extra, "--trainer.default_root_dir", str(runs / slug[name]),
                "--trainer.max_epochs", str(args.generations), "--model.store", str(runs / "store"),
                "--trainer.callbacks", "[]", *rows[name]]

    started = {}
    for name in rows:
        t = time.perf_counter()
        fit(common(name), runs / slug[name])
        started[name] = time.perf_counter() - t

    from diffes_pl.schedule import Schedule
    from diffes_pl.search.holdout import evaluate_schedules

    module, context, _ = load_run(common("default"))
    schedules = {name: Schedule.load(runs / slug[name] / "schedule.json") for name in rows}
    results = evaluate_schedules(context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed)
    from diffes_pl.macs import count_macs
    from diffes_pl.search.archive_file import read_evaluations

    dense_step = count_macs(context.adapter)  # batch 1, the built-in model
    report = {"config": args.config, "tiny": args.tiny, "generations": args.generations,
              "eval_probes": args.eval_probes, "rows": {}}
    base = schedules["default"].extra["cost"]
    for name, schedule in schedules.items():
        cost = schedule.extra["cost"]
        records = read_evaluations(runs / slug[name] / "evaluations.jsonl")
        row = {**results[name], "cost": cost, "generations_run": schedule.extra["generations"],
               "stopped": schedule.extra.get("stopped"), "search_fitness": schedule.fitness,
               "evaluated": len(records), "raced_out": sum(bool(r.get("raced_out")) for r in records),
               "fewer_probe_steps": base["probe_steps"] / cost["probe_steps"],
               "fewer_macs": base["macs"] / cost["macs"],
               "mac_fraction_per_probe_step": cost["macs"] / (cost["probe_steps"] * dense_step * 2),
               "wall_s_this_run": started[name]}
        row["ssim_vs_default"] = row["ssim"] - results["default"]["ssim"]
        report["rows"][name] = row
    report["dense"] = results["dense"]

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    step = dit_step_seconds(device, dtype, args.dit_batch, args.dit_repeats)
    report["dit_xl2_step"] = {**step, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    for name, row in report["rows"].items():
        seconds = row["cost"]["probe_steps"] * row["mac_fraction_per_probe_step"] * step["probe_step_s"]
        row["projected_dit_xl2_hours"] = seconds / 3600
    if device.type == "cuda":
        report["dit_xl2_measured"] = {
            "default": dit_search_seconds(device, dtype, args.dit_generations, None, 32),
            "racing": dit_search_seconds(device, dtype, args.dit_generations,
                                         (int(args.variants[0].split(",")[0]), float(args.variants[0].split(",")[1])),
                                         32)}

    print(f"\nBuilt-in model, {args.config}, {args.generations} generations; quality on {args.eval_probes} unseen "
          f"probes{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print(f"{'search':82s} {'gens':>4s} {'evals':>5s} {'out':>4s} {'probe-steps':>11s} {'fewer':>6s} {'TMAC':>7s} "
          f"{'SSIM':>7s} {'ΔSSIM':>8s} {'PSNR':>6s} {'DiT h*':>7s}")
    for name, row in report["rows"].items():
        print(f"{name:82s} {row['generations_run']:4d} {row['evaluated']:5d} {row['raced_out']:4d} "
              f"{row['cost']['probe_steps']:11d} {row['fewer_probe_steps']:5.2f}x {row['cost']['macs'] / 1e12:7.2f} "
              f"{row['ssim']:7.4f} {row['ssim_vs_default']:+8.4f} {row['psnr']:6.2f} {row['projected_dit_xl2_hours']:7.2f}")
    print(f"* projected DiT-XL/2 OBS 50 % search, denoiser time only, at {report['dit_xl2_step']['probe_step_s']:.3f} s "
          f"per dense probe-step ({report['dit_xl2_step']['device']}, {report['dit_xl2_step']['dtype']}, batch "
          f"{args.dit_batch}); the paper: {PAPER_HOURS} h on an L40S")
    for name, measured in report.get("dit_xl2_measured", {}).items():
        print(f"measured on {report['dit_xl2_step']['device']}: {name} {measured['hours_per_100_generations']:.2f} h per "
              f"100 generations ({measured['generations']} timed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
