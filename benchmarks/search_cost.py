"""What the search costs, and what racing and stopping when converged save, each alone and together,
over search seeds (issue 14; issue 26 part 6).

    python benchmarks/search_cost.py --jobs 2           # built-in model, 3 seeds × 4 searches of ≤ 100 generations (hours on 2 cores)
    python benchmarks/search_cost.py --tiny             # smoke run: proves the script works; numbers meaningless
    python benchmarks/search_cost.py --device cuda      # + the DiT-XL/2 search timed directly on the GPU

Rows (the search of `configs/tiny_obs.yaml` — OBS 50 %, 10 stages of 2 steps, 16 + 4 individuals, 64
probes — all on one shared store, each for every search seed `--seeds`):
- default: `--generations` (100, the paper's) generations, every child scored on all 64 probes;
- shipped config: the same search for `--shipped-generations` (30: configs/tiny_obs.yaml's max_epochs)
  — the default run's first 30 generations (the search is deterministic, so that prefix IS the
  30-generation run): its best schedule and its cost, read from the archive;
- `--variants race,z,patience`: stop when converged alone (`-,1,10`: no racing, patience 10), racing
  alone (`8/16,1,0`: children scored on 8 probes, then 16, finished on all 64 only if they can still
  reach the worst survivor with confidence z; `search/racing.py`), and both (`8/16,1,10`); stopping
  after `patience` generations without an improvement of the best fitness by more than `--delta`;
- `--replay-patience P…`: every row that does not stop (the default, racing alone) replayed with a
  convergence stop of patience P — no new search: a stop only decides where the same deterministic
  run ends, so the stopped run IS the prefix that `replay_stop` (Lightning's EarlyStopping rule on the
  best fitness after each generation) picks. The replay is checked against every measured stop row:
  same generations and cost, or the script fails.
Cost is the runs' own meter (schedule.json `extra.cost`: probe-steps — one probe through one
denoiser step, the CFG pair once — and denoiser MACs, the dense reference rollout included); the
factor against the default and against the shipped config is taken per seed, then summarised
(mean ± std over seeds). Quality: each seed's final schedule on its own block of TEST probes
(`_evidence.py`), SSIM vs dense per seed and pooled, and the paired difference to the default's
schedules (SSIM per probe, KID / FID of the digits features, 95 %).

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
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _evidence import (add_probe_arguments, block_seed, compare, heldout_features, score_block, summarise,
                       write_report)
from _runs import TINY, fit_many, load_run

from diffes_pl.evaluation.intervals import across_seeds

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


def prefix_row(run: Path, generations: int, reference_probe_steps: int, reference_macs: int) -> dict:
    """The search of `run` as if it had stopped after `generations` (no convergence stop: a prefix of
    the same deterministic run, which `diffes-pl fit --trainer.max_epochs <generations>` reproduces —
    a run stopped and resumed equals the uninterrupted one, tests/search/test_resume.py): the best
    fully evaluated schedule of those generations and what they cost."""
    from diffes_pl.search.archive_file import read_evaluations

    records = [r for r in read_evaluations(run / "evaluations.jsonl") if r["generation"] < generations]
    best = max((r for r in records if not r.get("raced_out")), key=lambda r: r["fitness"])
    cost = {"probe_steps": reference_probe_steps + sum(r["probe_steps"] for r in records),
            "macs": reference_macs + sum(r["macs_spent"] for r in records)}
    return {"levels": best["levels"], "fitness": best["fitness"], "cost": cost, "generations": generations,
            "evaluated": len(records), "raced_out": sum(bool(r.get("raced_out")) for r in records)}


def best_after_each_generation(records: list[dict], generations: int) -> list[float]:
    """The best fully evaluated fitness after generations 0 … generations−1 (raced-out children were
    never fully scored, so they cannot be the best): what the search logs for its stop each epoch."""
    best, out = float("-inf"), []
    for g in range(generations):
        best = max([best, *(r["fitness"] for r in records if r["generation"] == g and not r.get("raced_out"))])
        out.append(best)
    return out


def replay_stop(records: list[dict], generations: int, patience: int, delta: float) -> int:
    """How many generations the run of `records` would have run with `stop_patience` = patience and
    `stop_delta` = delta: Lightning's EarlyStopping (mode max) on the best fitness after each
    generation — an epoch improves when it beats the last improving one by more than delta; the
    search stops after `patience` epochs in a row that do not."""
    best, wait = float("-inf"), 0
    for g, current in enumerate(best_after_each_generation(records, generations)):
        if current - delta > best:
            best, wait = current, 0
        else:
            wait += 1
            if wait >= patience:
                return g + 1
    return generations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_obs.yaml"))
    parser.add_argument("--runs", default=str(ROOT / "runs/search_cost"))
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--shipped-generations", type=int, default=30,
                        help="the shipped config's max_epochs: its row is the default run's first N generations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (one probe block each)")
    parser.add_argument("--variants", nargs="+", default=["-,1,10", "8/16,1,0", "8/16,1,10"],
                        help="rows as race_probes,race_confidence,stop_patience (race_probes -: no racing; "
                             "stop_patience 0: no stop)")
    parser.add_argument("--delta", type=float, default=1e-4, help="stop_delta of the rows that stop")
    parser.add_argument("--replay-patience", type=int, nargs="*", default=[20, 30, 40],
                        help="patiences replayed on the archives of the rows that do not stop (no new search)")
    parser.add_argument("--jobs", type=int, default=1, help="searches run at once (each on one thread when > 1)")
    parser.add_argument("--n-boot", type=int, default=1000)
    add_probe_arguments(parser, probes=200)
    parser.add_argument("--device", default="cpu", help="where the DiT-XL/2 step (and with cuda, the search) is timed")
    parser.add_argument("--dtype", default=None, help="DiT-XL/2 dtype (default float32 on CPU, float16 on CUDA)")
    parser.add_argument("--dit-batch", type=int, default=4, help="probes per DiT-XL/2 step timed (CFG doubles it)")
    parser.add_argument("--dit-repeats", type=int, default=3)
    parser.add_argument("--dit-generations", type=int, default=100, help="with --device cuda: generations timed")
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 stages, 3 generations, 2 seeds, 12 probes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.shipped_generations, args.eval_probes, args.dit_repeats, args.dit_batch = 3, 2, 12, 1, 1
        args.seeds, args.variants, args.n_boot = args.seeds[:2], ["-,1,1", "4,1,0", "4,1,1"], 100
        args.replay_patience = [2]
    extra = [*TINY, "--model.pruner", "diffes_pl.pruners.WandaPruner", "--model.num_probes", "12"] if args.tiny else []
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"search_cost{'_tiny' if args.tiny else ''}.json")
    rows, slug, stops = {f"default ({args.generations} generations)": []}, {}, {}

    def stop_part(patience) -> str:  # one naming for the measured stop rows and the replayed ones
        return f"stop when converged (patience {patience}, delta {args.delta:g})"

    slug[next(iter(rows))] = "default"
    for variant in args.variants:
        m, z, patience = variant.split(",")
        options, parts, slug_ = [], [], []
        if m != "-":
            rungs = [int(r) for r in m.split("/")]  # 8/16: rungs (racing.Racing)
            parts.append(f"racing {' → '.join(map(str, rungs))} probes, z = {float(z):g}")
            options += ["--model.race_probes", str(rungs[0] if len(rungs) == 1 else rungs),
                        "--model.race_confidence", str(float(z))]
            slug_.append(f"race{'-'.join(map(str, rungs))}-z{float(z):g}")
        if int(patience):
            parts.append(stop_part(patience))
            options += ["--model.stop_patience", patience, "--model.stop_delta", str(args.delta)]
            slug_.append(f"stop{patience}")
        name = " + ".join(parts) if parts else "default"
        rows[name], slug[name] = options, "-".join(slug_) or "default"
        stops[name] = (int(patience), parts[0] if m != "-" else "")  # (patience, its racing part)
    stops[next(iter(rows))] = (0, "")
    # replayed rows: {name: (the no-stop row whose archive is cut, patience)}
    replayed = {f"{' + '.join(filter(None, [race, stop_part(p)]))}, replayed": (source, p)
                for source, (patience, race) in stops.items() if patience == 0 for p in args.replay_patience}

    def common(name: str, seed: int, run: Path | None = None, generations: int | None = None) -> list[str]:
        return ["--config", args.config, *extra,
                "--trainer.default_root_dir", str(run or runs / f"seed{seed}" / slug[name]),
                "--trainer.max_epochs", str(generations or args.generations), "--model.store", str(runs / "store"),
                "--trainer.callbacks", "[]", "--model.search_seed", str(seed), *rows[name]]

    default = next(iter(rows))
    # the shared store, alone, by a one-generation run of its own: the searches then run `--jobs` at a time
    fit_many([(common(default, args.seeds[0], runs / "store-build", 1), runs / "store-build")], 1)
    fit_many([(common(name, seed), runs / f"seed{seed}" / slug[name]) for name in rows for seed in args.seeds],
             args.jobs)

    from diffes_pl.macs import count_macs
    from diffes_pl.schedule import Schedule
    from diffes_pl.search.archive_file import read_evaluations

    module, context, _ = load_run(common(default, args.seeds[0]))
    dense_step = count_macs(context.adapter)  # batch 1, the built-in model
    shipped = f"shipped config ({args.shipped_generations} generations)"
    real = heldout_features()
    blocks: dict[str, list[dict]] = {}
    replay_checks: list[dict] = []
    per_seed: dict[str, list[dict]] = {}
    for b, seed in enumerate(args.seeds):
        schedules = {name: Schedule.load(runs / f"seed{seed}" / slug[name] / "schedule.json") for name in rows}
        base = schedules[default]
        ref = base.extra["cost"]
        prefix = prefix_row(runs / f"seed{seed}" / "default", args.shipped_generations, ref["reference_probe_steps"],
                            ref["reference_macs"])
        schedules[shipped] = dataclasses.replace(base, levels=list(prefix["levels"]), fitness=prefix["fitness"])
        archives = {name: read_evaluations(runs / f"seed{seed}" / slug[name] / "evaluations.jsonl") for name in rows}
        prefixes = {shipped: prefix}
        for name, (source, patience) in replayed.items():
            cut = replay_stop(archives[source], args.generations, patience, args.delta)
            prefixes[name] = prefix_row(runs / f"seed{seed}" / slug[source], cut, ref["reference_probe_steps"],
                                        ref["reference_macs"])
            schedules[name] = dataclasses.replace(base, levels=list(prefixes[name]["levels"]),
                                                  fitness=prefixes[name]["fitness"])
        for name, (patience, race) in stops.items():  # the replay must reproduce every measured stop
            source = next((n for n, (p, r) in stops.items() if p == 0 and r == race), None)
            if patience and source is not None:
                cut = replay_stop(archives[source], args.generations, patience, args.delta)
                measured = (schedules[name].extra["generations"], schedules[name].extra["cost"]["probe_steps"])
                got = prefix_row(runs / f"seed{seed}" / slug[source], cut, ref["reference_probe_steps"],
                                 ref["reference_macs"])
                replay_checks.append({"row": name, "search_seed": seed, "measured": measured,
                                      "replayed": (cut, got["cost"]["probe_steps"])})
                if (cut, got["cost"]["probe_steps"]) != measured:
                    raise RuntimeError(f"replaying {name!r} on {source!r}'s archive (seed {seed}) gives "
                                       f"{cut} generations, {got['cost']['probe_steps']} probe-steps; the run "
                                       f"measured {measured}: the replay no longer matches the search's stop")
        scored = score_block(context, schedules, args.eval_probes, block_seed(args.probe_set, b), real)
        for name, schedule in schedules.items():
            if name in prefixes:
                cut = prefixes[name]
                cost, generations, evaluated, raced_out = cut["cost"], cut["generations"], cut["evaluated"], cut["raced_out"]
                fitness, stopped = cut["fitness"], None
            else:
                records = archives[name]
                cost, generations = schedule.extra["cost"], schedule.extra["generations"]
                evaluated, raced_out = len(records), sum(bool(r.get("raced_out")) for r in records)
                fitness, stopped = schedule.fitness, schedule.extra.get("stopped")
            per_seed.setdefault(name, []).append({
                "search_seed": seed, "levels": scored[name]["levels"], "search_fitness": fitness,
                "generations_run": generations, "stopped": stopped, "evaluated": evaluated, "raced_out": raced_out,
                "cost": cost, "mac_fraction_per_probe_step": cost["macs"] / (cost["probe_steps"] * dense_step * 2)})
            blocks.setdefault(name, []).append(scored[name])
        blocks.setdefault("dense", []).append(scored["dense"])
    report = {"config": args.config, "tiny": args.tiny, "generations": args.generations, "seeds": args.seeds,
              "probe_set": args.probe_set, "eval_probes": args.eval_probes, "n_boot": args.n_boot,
              "probe_seeds": [block_seed(args.probe_set, b) for b in range(len(args.seeds))],
              "replay_checks": replay_checks, "rows": {}}
    summaries = {name: summarise(blks, real, args.n_boot) for name, blks in blocks.items()}
    for name in [default, shipped, *list(rows)[1:], *replayed]:
        seeds_ = per_seed[name]
        fewer = [d["cost"]["probe_steps"] / r["cost"]["probe_steps"] for r, d in zip(seeds_, per_seed[default])]
        fewer_shipped = [d["cost"]["probe_steps"] / r["cost"]["probe_steps"] for r, d in zip(seeds_, per_seed[shipped])]
        report["rows"][name] = {
            "searches": seeds_, **{k: v for k, v in summaries[name].items() if k != "features"},
            "fewer_probe_steps_than_default": across_seeds(fewer),
            "fewer_probe_steps_than_shipped": across_seeds(fewer_shipped),
            "probe_steps": across_seeds([r["cost"]["probe_steps"] for r in seeds_]),
            "generations_run": across_seeds([r["generations_run"] for r in seeds_]),
            "vs_default": None if name == default else compare(summaries[name], summaries[default], real, args.n_boot)}
    report["dense"] = {k: v for k, v in summaries["dense"].items() if k != "features"}

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    step = dit_step_seconds(device, dtype, args.dit_batch, args.dit_repeats)
    report["dit_xl2_step"] = {**step, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    for row in report["rows"].values():
        hours = [r["cost"]["probe_steps"] * r["mac_fraction_per_probe_step"] * step["probe_step_s"] / 3600
                 for r in row["searches"]]
        row["projected_dit_xl2_hours"] = across_seeds(hours)
    if device.type == "cuda":
        race = next((v for v in args.variants if not v.startswith("-")), "8,1,0").split(",")
        rungs = [int(r) for r in race[0].split("/")]
        report["dit_xl2_measured"] = {
            "default": dit_search_seconds(device, dtype, args.dit_generations, None, 32),
            "racing": dit_search_seconds(device, dtype, args.dit_generations,
                                         (rungs[0] if len(rungs) == 1 else tuple(rungs), float(race[1])), 32)}

    print(f"\nBuilt-in model, {args.config}; {len(args.seeds)} search seeds; quality on {args.probe_set} probes "
          f"{len(args.seeds)} × {args.eval_probes}{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print(f"{'search':70s} {'gens':>6s} {'probe-steps':>12s} {'vs default':>13s} {'vs shipped':>13s} "
          f"{'SSIM':>15s} {'ΔSSIM vs default [95 % CI]':>28s} {'DiT h*':>7s}")
    for name, row in report["rows"].items():
        f, g, v = row["fewer_probe_steps_than_default"], row["fewer_probe_steps_than_shipped"], row["vs_default"]
        a = row["across_seeds"]["ssim"]
        delta = "-" if v is None else (f"{v['ssim']['mean_diff']:+.4f} [{v['ssim']['low']:+.4f},{v['ssim']['high']:+.4f}]"
                                       f" {v['ssim']['decision']}")
        print(f"{name:70s} {row['generations_run']['mean']:6.1f} {row['probe_steps']['mean']:12.0f} "
              f"{f['mean']:6.2f}±{f['std']:4.2f}x {g['mean']:6.2f}±{g['std']:4.2f}x {a['mean']:7.4f}±{a['std']:.4f} "
              f"{delta:>28s} {row['projected_dit_xl2_hours']['mean']:7.2f}")
    print(f"* projected DiT-XL/2 OBS 50 % search, denoiser time only, at {report['dit_xl2_step']['probe_step_s']:.3f} s "
          f"per dense probe-step ({report['dit_xl2_step']['device']}, {report['dit_xl2_step']['dtype']}, batch "
          f"{args.dit_batch}); the paper: {PAPER_HOURS} h on an L40S")
    for name, measured in report.get("dit_xl2_measured", {}).items():
        print(f"measured on {report['dit_xl2_step']['device']}: {name} {measured['hours_per_100_generations']:.2f} h per "
              f"100 generations ({measured['generations']} timed)")
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
