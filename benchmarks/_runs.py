"""Helpers the benchmark scripts share: resumable `diffes-pl fit` runs, the smoke setting, and the
random / greedy baselines at the same number of fitness evaluations as a finished search."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffes_pl.search.archive_file import read_evaluations

# the smoke setting of the test suite (tests/helpers/search_runs.py) without its pruner: 4 stages of 2 steps, few probes
TINY = ["--model.num_stages", "4", "--model.steps", "8", "--model.num_probes", "6", "--model.offspring", "6",
        "--model.survivors", "2", "--model.max_move", "2", "--data.nsamples", "4", "--data.batch_size", "4"]


def _fit_command(common: list[str], run: Path) -> list[str] | None:
    """The `diffes-pl fit` command that finishes the run in `run`, or None when it finished there (a
    finished run is extended, from its last checkpoint, when `--trainer.max_epochs` asks for more
    generations than it ran and it did not stop on convergence)."""
    done = run / "schedule.json"
    if done.exists():
        extra = json.loads(done.read_text())["extra"]
        wanted = int(common[common.index("--trainer.max_epochs") + 1]) if "--trainer.max_epochs" in common else 0
        if extra.get("finished") and (extra.get("stopped") or extra.get("generations", 0) >= wanted):
            return None
    resume = ["--ckpt_path", "last"] if (run / "checkpoints" / "last.ckpt").exists() else []
    return [sys.executable, "-m", "diffes_pl.cli", "fit", *common, *resume]


def _running_elsewhere(run: Path) -> bool:
    """Whether another benchmark process is fitting into `run` now (its fit.pid names a live process)."""
    try:
        os.kill(int((run / "fit.pid").read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def _start(command: list[str], run: Path, **kwargs) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(command, **kwargs)
    (run / "fit.pid").write_text(str(proc.pid))
    return proc


def fit(common: list[str], run: Path) -> None:
    """`diffes-pl fit` into `run` unless it finished there (resumed when it stopped); waits first while
    another benchmark fits into the same folder (two benchmarks sharing runs)."""
    while _running_elsewhere(run):
        time.sleep(10)
    command = _fit_command(common, run)
    if command is not None and _start(command, run).wait():
        raise subprocess.CalledProcessError(1, command)


def _log(run: Path):
    """The run's fit.log, appended to (the folder made if new)."""
    run.mkdir(parents=True, exist_ok=True)
    return open(run / "fit.log", "a")


def fit_many(runs: list[tuple[list[str], Path]], jobs: int = 1) -> None:
    """`fit` for several (common, run) pairs, `jobs` at a time, each process on one thread when
    jobs > 1 (its output in <run>/fit.log). Raises after all finished if any failed."""
    if jobs <= 1:
        for common, run in runs:
            fit(common, run)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    todo = [(c, r) for c, r in runs if _fit_command(c, r) is not None]
    running: list[tuple[subprocess.Popen, Path]] = []
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            ready = [i for i, (_, r) in enumerate(todo) if not _running_elsewhere(r)]
            if not ready:
                break
            common, run = todo.pop(ready[0])
            command = _fit_command(common, run)  # another process may have finished it meanwhile
            if command is not None:
                with _log(run) as log:
                    running.append((_start(command, run, stdout=log, stderr=subprocess.STDOUT, env=env), run))
        time.sleep(2)
        for proc, run in list(running):
            if proc.poll() is not None:
                running.remove((proc, run))
                if proc.returncode:
                    failed.append(f"{run} (exit {proc.returncode}, see {run / 'fit.log'})")
    if failed:
        raise RuntimeError("diffes-pl fit failed: " + "; ".join(failed))


def load_run(common: list[str]):
    """The finished run's LightningModule with its store opened and its search set up (probes, fitness
    cache of the run's metric), as `diffes-pl fit` had them: (module, context, search)."""
    from diffes_pl.cli import DiffESCLI

    cli = DiffESCLI(args=common, run=False)  # run=False: no subcommand
    module, trainer = cli.model, cli.trainer
    module.ensure_store(trainer, cli.datamodule, log=lambda *_: None)
    module.trainer = trainer
    module.setup("fit")
    return module, module.context, module.search


def baselines_at_same_budget(module, run: Path, cache: Path | None = None) -> dict:
    """Random and greedy search with the same number of fitness evaluations as the finished search in
    `run` (its evaluations.jsonl), on the same store, probes and fitness. Returns
    {"evaluations": n, "random": {...}, "greedy": {...}} with each search's best levels, fitness,
    evaluations used and whether it stopped early; cached as JSON in `cache` (reused if its
    evaluation count matches)."""
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved["evaluations"] == len(read_evaluations(run / "evaluations.jsonl")):
            return saved
    from diffes_pl.search import baselines

    search, context, hp = module.search, module.context, module.hparams
    n_evals = len(read_evaluations(run / "evaluations.jsonl"))
    H, w, S = context.levels_max, context.partition.steps_per_stage, context.partition.num_stages

    def evaluate(levels) -> float:
        value, _ = search.evaluate(tuple(levels), None)
        return search.metric.score(value)

    gen = torch.Generator().manual_seed(hp.search_seed + 1)
    found = {"random": baselines.random_search(evaluate, n_evals, S, H, hp.target_level, w, gen),
             "greedy": baselines.greedy_search(evaluate, n_evals, S, H, hp.target_level, w, hp.max_move)}
    out = {"evaluations": n_evals}
    for name, result in found.items():
        out[name] = {"levels": list(result.best_levels), "fitness": result.best_fitness,
                     "evals_used": result.evals_used, "evals_budget": result.n_evals,
                     "stopped_early": result.stopped_early}
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(cache)
    return out


def same_budget_schedules(module, run: Path, cache: Path | None = None) -> tuple[dict, dict]:
    """The searched schedule of the finished run in `run` and the baselines at its budget: uniform,
    the MosaicDiff-style heuristic, random and greedy search with the same number of evaluations
    (`baselines_at_same_budget`). Returns ({name: Schedule}, info) where info holds the evaluation
    counts and every schedule's search fitness (the run's metric on the run's probes)."""
    from diffes_pl.schedule import Schedule
    from diffes_pl.search import baselines

    search, context, hp = module.search, module.context, module.hparams
    H, w, S = context.levels_max, context.partition.steps_per_stage, context.partition.num_stages
    found = baselines_at_same_budget(module, run, cache)
    mk = lambda levels: Schedule(list(levels), H, hp.target_level, w, partition=context.partition.to_dict())
    schedules = {
        "uniform": mk([int(hp.target_level)] * S),
        "mosaicdiff heuristic": mk(baselines.mosaicdiff_schedule(S, H, hp.target_level, w)),
        "random search": mk(found["random"]["levels"]),
        "greedy search": mk(found["greedy"]["levels"]),
        "Diff-ES": Schedule.load(run / "schedule.json"),
    }

    score = lambda levels: search.metric.score(search.evaluate(tuple(levels), None)[0])  # cached
    info = {**found, "search_fitness": {name: score(s.levels) for name, s in schedules.items()}}
    return schedules, info
