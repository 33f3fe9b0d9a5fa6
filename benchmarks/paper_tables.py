"""The paper's tables on the built-in model, for every pruner, over search seeds, with paired decisions
(issue 14 item 5; issue 26 parts 1–3 and 5).

    python benchmarks/paper_tables.py --jobs 2                   # 6 settings × 3 seeds × 30 generations (hours on 2 cores)
    python benchmarks/paper_tables.py --settings obs-50 --jobs 2 # one setting: about 80 minutes on 2 CPU cores
    python benchmarks/paper_tables.py --rescore                  # the report's schedules scored again, no search
    python benchmarks/paper_tables.py --tiny                     # smoke run: a minute or two, numbers meaningless

Settings (built-in tiny DiT on digits, 10 stages of 2 DDIM steps): width pruning with OBS
(configs/tiny_obs.yaml) and Wanda (configs/tiny_wanda.yaml) at levels 2 and 4 of 8 (25 % and 50 % of
the heads and MLP channels), depth pruning (configs/tiny_depth.yaml) of 1 and 2 of the 6 blocks on
average. Each pruner's trajectory store is built once and shared by its two sparsities and every search.

Searches, all by the same loop (`EvolutionarySearch`, `--model.proposal`), so that their evaluations
compare one for one: same 64 probes, SSIM fitness, racing (`--race`, default rungs 8 → 16 → 64: what
makes 30 generations affordable; the search_cost benchmark shows it keeps the final schedule) and
cost meter:
- Diff-ES: the shipped config's search (16 + 4, max_move 3, hybrid init) for `--generations`
  generations, one run per search seed (`--seeds`);
- random search: `offspring + survivors` random budget-meeting schedules, then `offspring` fresh ones
  per generation, for as many generations: the same number of evaluations; one run per seed;
- greedy search: best-improvement hill climbing from uniform, each round the current best's WHOLE
  neighbourhood of one-level moves (S·(S−1) = 90 schedules with 10 stages); as many whole rounds as
  fit in Diff-ES's planned evaluations (20 + 16·29 = 484 at 30 generations: 5 rounds, 451), never
  more; deterministic, one run.
Fixed rows: dense; uniform; the MosaicDiff-style heuristic; OBS-Diff (OBS only: ONE pruned model for the
whole trajectory from timestep-weighted Hessians, blocks pruned in 3 groups in turn —
configs/tiny_obsdiff.yaml — on its own 1-stage store).

Scored on `--eval-probes` probes per seed block of the TEST probe set (`_evidence.py`: seed b's
schedules on block b, fixed rows on every block; no search or setting saw them): SSIM and PSNR vs the
dense model, class accuracy (digits classifier), KID with its 95 % bootstrap interval and FID of the
digits features against the 297 held-out real digits, per seed (mean ± std over seeds) and pooled over
the blocks; MACs of the 20-step trajectory (fraction of dense); CPU latency per image of seed 0's
schedule (routed, median of repeats). Decisions: Diff-ES against every other row on the pooled probes,
SSIM per probe (paired bootstrap + sign-flip), KID and FID (paired bootstrap of the difference), a
win or loss only at 95 %.

Every `diffes-pl fit` is resumed when it stopped and skipped when it finished (`--jobs` at a time);
each setting's table is cached in its run folder (`--runs`), so a rerun only redoes what is missing.
Prints one table per setting; writes benchmarks/results/paper_tables.json (`--tiny`: paper_tables_tiny.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from _evidence import (add_search_arguments, block_seed, compare, heldout_features, print_decisions, print_rows,
                       same_images, STATISTICS, score_block, summarise, to_json)
from _runs import TINY, fit, fit_many, load_run

ROOT = Path(__file__).resolve().parents[1]
# name: (pruner = configs/tiny_<pruner>.yaml, target level); H = 8 (width) or 6 blocks (depth)
SETTINGS = {
    "obs-25": ("obs", 2), "obs-50": ("obs", 4),
    "wanda-25": ("wanda", 2), "wanda-50": ("wanda", 4),
    "depth-1of6": ("depth", 1), "depth-2of6": ("depth", 2),
}
SEARCHES = {"random search": "random", "greedy search": "greedy", "Diff-ES": "evolution"}
SEEDED = ("random search", "Diff-ES")
FIXED = ("dense", "uniform", "mosaicdiff heuristic", "OBS-Diff")


def latency(context, schedule, args) -> float:
    """Seconds per image of a full routed sampling run (dense when `schedule` is None)."""
    from diffes_pl.evaluation.generate import latency_per_image
    from diffes_pl.routing import Router

    router = None if schedule is None else Router(context.adapter, context.store, schedule)
    try:
        return latency_per_image(context.adapter, router, batch_size=args.latency_batch_size,
                                 sampler=context.sampler, steps=context.steps, guidance=context.guidance,
                                 repeats=args.latency_repeats)
    finally:
        if router is not None:
            router.remove()


def greedy_generations(context, target: int, planned: int) -> int:
    """Generations of greedy search: its first evaluates uniform, each later one a whole neighbourhood
    (one-level moves from the current best; the uniform schedule's is the largest), as many as fit in
    `planned` evaluations."""
    from diffes_pl.search import level_space

    w = context.partition.steps_per_stage
    S, H = context.partition.num_stages, context.levels_max
    size = len(level_space.neighbours(level_space.uniform(S, H, target, w), H, w, 1))
    return 1 + max(1, (planned - 1) // size)


def schedule_of(context, target: int, levels):
    """A level-only schedule of the setting's partition."""
    from diffes_pl.schedule import Schedule

    partition = context.partition
    return Schedule(list(levels), context.levels_max, target, partition.steps_per_stage, partition=partition.to_dict())


def setting_arguments(name: str, runs: Path, extra: list[str]) -> list[str]:
    """The `diffes-pl fit` arguments every search of setting `name` shares: its config, its pruner's
    shared store under `runs`, its target level (no run folder, generations, seed or racing)."""
    pruner, target = SETTINGS[name]
    return ["--config", str(ROOT / f"configs/tiny_{pruner}.yaml"), *extra, "--model.store", str(runs / f"{pruner}-store"),
            "--model.target_level", str(target), "--trainer.callbacks", "[]"]


def open_setting(name: str, args, extra: list[str], folder: Path, runs: Path):
    """The setting's shared store (built alone by one generation of the seed-0 Diff-ES run if missing),
    opened: (module, context, common), common(row, seed, generations) a search's fit arguments."""
    pruner, target = SETTINGS[name]
    base = [*setting_arguments(name, runs, extra), "--model.race_probes", args.race]

    def common(row: str, seed: int, generations: int) -> list[str]:
        return [*base, "--trainer.default_root_dir", str(folder / f"{SEARCHES[row]}-{seed}"),
                "--trainer.max_epochs", str(generations), "--model.search_seed", str(seed),
                "--model.proposal", SEARCHES[row]]

    first = common("Diff-ES", args.seeds[0], 1)
    if not (runs / f"{pruner}-store").exists():
        fit(first, folder / f"evolution-{args.seeds[0]}")
    module, context, _ = load_run(first)
    return module, context, common


def search_runs(name: str, args, extra: list[str], folder: Path, runs: Path) -> dict:
    """Runs every search of a setting (resumable): the opened setting, each search's schedules per seed
    and what they cost."""
    from diffes_pl.schedule import Schedule
    from diffes_pl.search.archive_file import read_evaluations

    target = SETTINGS[name][1]
    module, context, common = open_setting(name, args, extra, folder, runs)
    hp = module.hparams
    planned = hp.offspring + hp.survivors + hp.offspring * (args.generations - 1)
    greedy_g = greedy_generations(context, target, planned)
    jobs = [(common(row, seed, args.generations), folder / f"{SEARCHES[row]}-{seed}")
            for seed in args.seeds for row in SEEDED]
    jobs.append((common("greedy search", 0, greedy_g), folder / "greedy-0"))
    fit_many(jobs, args.jobs)
    folders = {row: [folder / f"{SEARCHES[row]}-{seed}" for seed in (args.seeds if row in SEEDED else [0])]
               for row in SEARCHES}
    schedules = {row: [Schedule.load(run / "schedule.json") for run in runs_] for row, runs_ in folders.items()}
    spent = {row: {"search_fitness": [s.fitness for s in schedules[row]],
                   "evaluations": [len(read_evaluations(run / "evaluations.jsonl")) for run in folders[row]],
                   "generations_run": [s.extra.get("generations") for s in schedules[row]],
                   "probe_steps": [s.extra["cost"]["probe_steps"] for s in schedules[row]]} for row in SEARCHES}
    return {"module": module, "context": context, "planned_evaluations": planned, "greedy_generations": greedy_g,
            "schedules": schedules, "spent": spent, "latency_s": {}}


def from_report(name: str, args, extra: list[str], folder: Path, runs: Path, earlier: dict) -> dict:
    """`--rescore`: the searched schedules of the setting's table in the report (no search), with what
    their searches cost and every row's latency as measured then."""
    module, context, _ = open_setting(name, args, extra, folder, runs)
    rows = earlier["rows"]
    schedules = {row: [schedule_of(context, earlier["target_level"], lv)
                       for lv in (rows[row]["levels"] if row in SEEDED else [rows[row]["levels"]])] for row in SEARCHES}
    spent = {row: {k: rows[row][k] for k in ("search_fitness", "evaluations", "generations_run", "probe_steps")}
             for row in SEARCHES}
    return {"module": module, "context": context, "planned_evaluations": earlier["planned_evaluations"],
            "greedy_generations": earlier["greedy_generations"], "schedules": schedules, "spent": spent,
            "latency_s": {row: r["latency_s"] for row, r in rows.items()}}


def obsdiff(name: str, args, extra: list[str], folder: Path):
    """OBS-Diff's one model (OBS settings only): (schedule, context) on its own 1-stage store."""
    from diffes_pl.schedule import Schedule

    target = SETTINGS[name][1]
    run = folder / "obsdiff"
    common = ["--config", str(ROOT / "configs/tiny_obsdiff.yaml"), *extra, "--model.num_stages", "1",
              "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1", "--trainer.callbacks", "[]",
              "--model.target_level", str(target), "--model.pruner.init_args.sequential_level", str(target)]
    fit(common, run)
    _, context, _ = load_run(common)
    return Schedule.load(run / "schedule.json"), context


def run_setting(name: str, args, extra: list[str], runs: Path, earlier: dict | None = None) -> tuple[dict, bool]:
    """One setting's table (cached in its folder's table.json); and whether it was read back.
    `earlier`: the report's table of the setting, rescored (`--rescore`) instead of searching."""
    from diffes_pl.search import baselines

    pruner, target = SETTINGS[name]
    folder = runs / name
    cached = folder / "table.json"
    wanted = {"eval_probes": args.eval_probes, "probe_set": args.probe_set, "generations": args.generations,
              "seeds": args.seeds, "race": args.race, "statistics": STATISTICS}
    if cached.exists():
        table = json.loads(cached.read_text())
        if all(table.get(k) == v for k, v in wanted.items()):
            return table, True
    found = (search_runs(name, args, extra, folder, runs) if earlier is None else
             from_report(name, args, extra, folder, runs, earlier))
    module, context = found["module"], found["context"]
    hp, partition, H = module.hparams, context.partition, context.levels_max
    w, S = partition.steps_per_stage, partition.num_stages
    fixed = {"uniform": schedule_of(context, hp.target_level, [int(hp.target_level)] * S),
             "mosaicdiff heuristic": schedule_of(context, hp.target_level,
                                                 baselines.mosaicdiff_schedule(S, H, hp.target_level, w))}
    searched = found["schedules"]
    od = obsdiff(name, args, extra, folder) if pruner == "obs" else None

    real = heldout_features()
    blocks: dict[str, list[dict]] = {}
    for b, seed in enumerate(args.seeds):
        probe_seed = block_seed(args.probe_set, b)
        schedules = {**fixed, **{row: runs_[b if row in SEEDED else 0] for row, runs_ in searched.items()}}
        results = score_block(context, schedules, args.eval_probes, probe_seed, real)
        if od is not None:
            od_results = score_block(od[1], {"OBS-Diff": od[0]}, args.eval_probes, probe_seed, real)
            # same probes, same dense model: its dense images must be ours (else the two are not comparable)
            if not torch.equal(od_results["dense"]["images"], results["dense"]["images"]):
                raise RuntimeError("OBS-Diff's dense reference differs from the stage-wise run's")
            results["OBS-Diff"] = od_results["OBS-Diff"]
        for row, result in results.items():
            blocks.setdefault(row, []).append({**result, "search_seed": seed if row in SEEDED else None})
    if earlier is not None:
        same_images(blocks, earlier["rows"], name)
    dense_macs = blocks["dense"][0]["macs"]
    order = [r for r in (*FIXED, *SEARCHES) if r in blocks]
    rows = {}
    for row in order:
        out = {"levels": [blk["levels"] for blk in blocks[row]] if row in SEEDED else blocks[row][0]["levels"],
               "mac_fraction": blocks[row][0]["macs"] / dense_macs, **summarise(blocks[row], real, args.n_boot)}
        out.update(found["spent"].get(row, {}))
        sample = od[0] if row == "OBS-Diff" else searched[row][0] if row in SEARCHES else fixed.get(row)
        out["latency_s"] = found["latency_s"].get(row) or latency(od[1] if row == "OBS-Diff" else context, sample, args)
        rows[row] = out
    for row in rows.values():
        row["speedup"] = rows["dense"]["latency_s"] / row["latency_s"]
    decisions = {other: compare(rows["Diff-ES"], rows[other], real, n_boot=args.n_boot)
                 for other in order if other not in ("Diff-ES", "dense")}
    table = {**wanted, "config": str(ROOT / f"configs/tiny_{pruner}.yaml"), "pruner": module.pruner.name,
             "target_level": target, "levels_max": H, "sparsity": target / H, "depth": bool(context.store.depth),
             "num_stages": S, "steps": context.steps, "planned_evaluations": found["planned_evaluations"],
             "greedy_generations": found["greedy_generations"], "n_boot": args.n_boot,
             "probe_seeds": [block_seed(args.probe_set, b) for b in range(len(args.seeds))],
             "rows": to_json(rows), "diffes_vs": decisions}
    cached.parent.mkdir(parents=True, exist_ok=True)  # a rescore may search nothing there
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(cached)
    return table, False


def print_table(name: str, table: dict, args) -> None:
    unit = "blocks" if table["depth"] else "heads and MLP channels"
    seeds = len(table["seeds"])
    print(f"\n{name}: {table['pruner']}, level {table['target_level']} of {table['levels_max']} "
          f"({100 * table['sparsity']:.1f} % of the {unit}), {table['num_stages']} stages; {seeds} search seeds × "
          f"{table['generations']} generations, {table['planned_evaluations']} planned evaluations; "
          f"{table['probe_set']} probes {seeds} × {table['eval_probes']}"
          f"{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print_rows(table["rows"], {"evals": lambda r: "/".join(map(str, r.get("evaluations", []))) or "-",
                               "MACs %": lambda r: f"{100 * r['mac_fraction']:.2f}",
                               "speedup": lambda r: f"{r['speedup']:.2f}x"})
    print_decisions("Diff-ES", table["diffes_vs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    add_search_arguments(parser, probes=200)  # greedy gets whole rounds within Diff-ES's evaluations
    parser.add_argument("--latency-batch-size", type=int, default=16)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke setting: 4 stages of 2 steps, 6 probes, 2 generations, 2 seeds of 12 test probes")
    parser.add_argument("--runs", default=str(ROOT / "runs/paper_tables"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="score the schedules of the report (--out) again with the current statistics, no search "
                             "(after a change of estimator; the searches' costs and the latencies are kept)")
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.latency_batch_size, args.latency_repeats = 2, 12, 2, 1
        args.seeds, args.n_boot, args.race = args.seeds[:2], 100, "[2,4]"
    extra = TINY if args.tiny else []
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"paper_tables{'_tiny' if args.tiny else ''}.json")
    start = time.time()
    report = {"tiny": args.tiny, "generations": args.generations, "seeds": args.seeds, "race": args.race,
              "probe_set": args.probe_set, "eval_probes": args.eval_probes, "n_boot": args.n_boot,
              "latency_batch_size": args.latency_batch_size,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"torch threads {torch.get_num_threads()}", "settings": {}, "reused": []}
    if out.exists():  # settings of an earlier invocation (another --settings subset) stay in the report
        earlier = json.loads(out.read_text())
        if all(earlier.get(k) == report[k] for k in ("tiny", "generations", "seeds", "race", "probe_set", "eval_probes")):
            report["settings"] = earlier.get("settings", {})
    missing = [n for n in args.settings if n not in report["settings"]]
    if args.rescore and missing:
        raise SystemExit(f"--rescore: {out} holds no table of {', '.join(missing)} with these settings (generations, "
                         "seeds, racing, probes): run those settings without --rescore, or name another --out")
    for name in args.settings:
        table, reused = run_setting(name, args, extra, runs, report["settings"][name] if args.rescore else None)
        report["settings"][name] = table
        if reused:
            report["reused"].append(name)
        print_table(name, table, args)
        report["elapsed_s"] = time.time() - start  # this invocation only: `reused` settings were computed before
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
