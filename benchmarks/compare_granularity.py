"""Structured vs 2:4 vs unstructured at 50 % of the prunable weights, each as OBS-Diff's one model, as a
uniform stage-wise schedule and searched by Diff-ES — on probes no search saw (issue 25, part 5).

    python benchmarks/compare_granularity.py            # built-in model, about 40 minutes on 2 CPU cores

Per granularity (every attention and MLP linear layer of the built-in model; half of their weights):
  one-shot    OBS-Diff's configuration: 1 stage, timestep-weighted Hessians, 3 sequential block groups
              (configs/tiny_obsdiff.yaml, tiny_obsdiff_2of4.yaml, tiny_obsdiff_unstructured.yaml)
  uniform     the 5-stage store's uniform schedule (tiny_obs.yaml with 5 stages, tiny_obs_2of4.yaml,
              tiny_obs_unstructured.yaml): every stage at the target level
  searched    Diff-ES on that store, `--seeds` search seeds (each its own run, one shared store)
Scored on `--eval-probes` fresh probes (seed `--eval-seed`, never used by any search or for tuning):
SSIM and PSNR vs the dense model, class accuracy and digits-FID of the decoded digits, MACs (dense-
equivalent; structured is the only one a dense kernel runs faster, 2:4 needs a sparse kernel).
Differences are called only by a paired test at 95 % (`evaluation/intervals.py`): per-probe SSIM of the
searched schedules (pooled over seeds per probe) against the uniform and the one-shot model (paired
bootstrap interval + sign-flip test), and KID of the digits classifier's standardised features against
the held-out real digits (`_evidence.kid`; decided by `kid_difference`: the same probe indices for both,
per seed).
Prints a table; writes benchmarks/results/compare_granularity.json (per seed, per probe and the mean).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _evidence import kid
from _runs import fit, load_run

from diffes_pl.data.digits import load_digits_split
from diffes_pl.evaluation.digits_features import DigitsFeatures
from diffes_pl.evaluation.intervals import across_seeds, kid_difference, pooled_paired, standardise
from diffes_pl.evaluation.metrics import fid_from_features
from diffes_pl.schedule import Schedule
from diffes_pl.search.holdout import evaluate_schedules

ROOT = Path(__file__).resolve().parents[1]
GRANULARITIES = {  # name: (one-shot config, stage-wise config)
    "structured": ("tiny_obsdiff.yaml", "tiny_obs.yaml"),
    "2:4": ("tiny_obsdiff_2of4.yaml", "tiny_obs_2of4.yaml"),
    "unstructured": ("tiny_obsdiff_unstructured.yaml", "tiny_obs_unstructured.yaml"),
}


def _uniform(context, module) -> Schedule:
    store, partition = context.store, context.partition
    return Schedule.uniform(int(module.hparams.target_level), context.levels_max, partition.steps_per_stage,
                            partition=partition.to_dict(), pruner=store.pruner, store_key=store.key)


def _statistics(rows: dict, features: dict, real, seeds: int, n_boot: int) -> dict:
    """Paired decisions of the searched schedules against the uniform and the one-shot model."""
    searched = [f"searched seed {s}" for s in range(seeds)]
    out = {}
    for base in ("uniform", "one-shot"):
        ssim = pooled_paired([rows[s]["ssim_per_probe"] for s in searched],
                             [rows[base]["ssim_per_probe"]] * seeds, n_boot=n_boot, seed=0)
        kid = {s: kid_difference(*standardise(real, features[s], features[base]), n_boot=n_boot, seed=i).to_dict()
               for i, s in enumerate(searched)}
        out[f"searched vs {base}"] = {"ssim": ssim.to_dict(), "kid_per_seed": kid}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs/compare_granularity"))
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--probes", type=int, default=32, help="search probes")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds per granularity")
    parser.add_argument("--eval-probes", type=int, default=200)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--only", nargs="*", default=list(GRANULARITIES))
    parser.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of each comparison")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_granularity.json"))
    args = parser.parse_args()
    work = Path(args.work)
    small = ["--model.num_probes", str(args.probes)]
    out = {"settings": vars(args), "results": {}, "statistics": {}}
    net = DigitsFeatures()
    real = net((load_digits_split("test")[0] + 1) / 2).detach()  # held-out digits [N, 128]
    evaluate = lambda context, schedules, images: evaluate_schedules(  # noqa: E731
        context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed, per_probe=("ssim",), images=images)
    for name in args.only:
        one_shot, stage_wise = GRANULARITIES[name]
        rows: dict = {}
        images: dict = {}
        common = ["--config", str(ROOT / "configs" / one_shot), *small, "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(work / name.replace(":", "of") / "one_shot")]
        fit(common, work / name.replace(":", "of") / "one_shot")
        module, context, _ = load_run(common)
        got = evaluate(context, {"one-shot": _uniform(context, module)}, images)
        rows["dense"], rows["one-shot"] = got["dense"], got["one-shot"]
        for seed in range(args.seeds):
            run = work / name.replace(":", "of") / f"seed{seed}"
            common = ["--config", str(ROOT / "configs" / stage_wise), *small, "--model.num_stages", str(args.stages),
                      "--model.search_seed", str(seed), "--model.store", str(work / name.replace(":", "of") / "store"),
                      "--trainer.max_epochs", str(args.generations), "--trainer.default_root_dir", str(run)]
            fit(common, run)
            module, context, _ = load_run(common)
            searched = Schedule.load(run / "schedule.json")
            schedules = {f"searched seed {seed}": searched}
            if seed == 0:
                schedules["uniform"] = _uniform(context, module)
            got = evaluate(context, schedules, images)
            rows.update({k: v for k, v in got.items() if k != "dense"})
        features = {label: net(x).detach() for label, x in images.items()}
        for label, row in rows.items():  # held-out digits: FID and KID of the classifier's features
            row["test_fid"], row["test_kid"] = fid_from_features(real, features[label]), kid(real, features[label])
        seeds = [rows[f"searched seed {s}"] for s in range(args.seeds)]
        rows["searched (mean over seeds)"] = {
            key: across_seeds([r[key] for r in seeds]) for key in ("ssim", "psnr", "class_accuracy", "test_fid", "test_kid")}
        out["results"][name] = rows
        out["statistics"][name] = _statistics(rows, features, real, args.seeds, args.n_boot)
    print(f"\nBuilt-in model, 50 % of the attention and MLP weights; {args.eval_probes} unseen probes (seed "
          f"{args.eval_seed}); searched: {args.seeds} seeds × {args.generations} generations, {args.stages} stages")
    print(f"{'granularity':13s} {'schedule':28s} {'levels':16s} {'SSIM':>7s} {'PSNR':>6s} {'acc %':>6s} {'FID':>7s} "
          f"{'KID':>8s}")
    for name, rows in out["results"].items():
        for label, row in rows.items():
            levels = "" if row.get("levels") is None else " ".join(map(str, row["levels"]))
            get = lambda key: row[key]["mean"] if isinstance(row[key], dict) else row[key]  # noqa: E731
            print(f"{name:13s} {label:28s} {levels:16s} {get('ssim'):7.4f} {get('psnr'):6.2f} "
                  f"{100 * get('class_accuracy'):6.1f} {get('test_fid'):7.3f} {get('test_kid'):8.5f}")
        for versus, stats in out["statistics"][name].items():
            ssim = stats["ssim"]
            kids = [k["decision"] for k in stats["kid_per_seed"].values()]
            print(f"{name:13s} {versus}: SSIM {ssim['mean_diff']:+.4f} [{ssim['low']:+.4f}, {ssim['high']:+.4f}] "
                  f"p {ssim['p_value']:.3g} {ssim['decision']}; KID per seed {', '.join(kids)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
