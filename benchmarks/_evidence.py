"""What the comparison benchmarks share so that their figures hold up (issue 26): the validation and
test probe sets, the digits features of the held-out real digits, KID / FID, and the paired
win / tie / loss decisions between two rows of a table.

Probe sets. `--probe-set validation` (seed 99991: what every earlier benchmark scored on, and what
settings were tuned on) is for development; `--probe-set test` (the default of the scripts that
import this) draws from another seed family that no setting was chosen on, and is what the README
reports. A benchmark scoring several search seeds uses one block of probes per seed, block b seeded
`base + b`: seed b's schedule is scored on block b, every seed-independent row on every block, so
each row has one image per probe of the pooled set and two rows pair probe by probe.

Decisions (`evaluation/intervals.py`, 95 %): per-probe SSIM vs dense by a paired bootstrap interval
and a sign-flip test; KID (on standardised features, see `kid`) by `kid_difference` and FID by
`distribution_difference` (basic interval), both of the digits classifier's 128-d features against
the 297 held-out digits, the same probe indices for both rows in every replicate and the real digits
resampled once per replicate for both. "win" / "loss" only when the interval and the test agree;
otherwise "tie". Why not the generic bootstrap for both: a naive resample pairs copies of one row
in KID's unbiased estimator (several times KID itself), and FID's percentile interval carries a
resampling bias that differs between rows of different spread (`intervals.py`, tested there).
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from diffes_pl.evaluation.intervals import (across_seeds, distribution_difference, kid_difference, kid_interval,
                                            kid_unbiased, paired_difference, standardise)
from diffes_pl.evaluation.metrics import fid_from_features

PROBE_SEEDS = {"validation": 99991, "test": 7_300_001}
# names the estimators behind every interval and decision: a table cached under another one is rescored
STATISTICS = ("kid_unbiased on standardised features (constant ones at the mean scale), count bootstrap; "
              "fid basic bootstrap; ssim paired + sign-flip")


def add_search_arguments(parser, probes: int) -> None:
    """The options every seeded comparison shares: its searches (--generations, --seeds, --race,
    --jobs), its statistics (--n-boot) and its probes (`add_probe_arguments`)."""
    parser.add_argument("--generations", type=int, default=30, help="generations of every search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (one probe block each)")
    parser.add_argument("--race", default="[8,16]", help="model.race_probes of every search")
    parser.add_argument("--jobs", type=int, default=1, help="searches run at once (each on one thread when > 1)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of intervals and decisions")
    add_probe_arguments(parser, probes)


def add_probe_arguments(parser, probes: int) -> None:
    """--probe-set and --eval-probes (per block)."""
    parser.add_argument("--probe-set", choices=list(PROBE_SEEDS), default="test",
                        help="validation: the probes settings were tuned on (seed 99991); test: the reported figures")
    parser.add_argument("--eval-probes", type=int, default=probes, help="probes per block (one block per search seed)")


def block_seed(probe_set: str, block: int) -> int:
    """The probe seed of one block of a probe set."""
    return PROBE_SEEDS[probe_set] + block


@functools.lru_cache(maxsize=1)
def _feature_net():
    from diffes_pl.evaluation.digits_features import DigitsFeatures

    return DigitsFeatures().eval()


@torch.no_grad()
def features(images: torch.Tensor) -> torch.Tensor:
    """[N, 128] float64 digits-classifier features of images [N, 1, 8, 8] in [0, 1]."""
    return _feature_net()(images.float().cpu())


@functools.lru_cache(maxsize=1)
def heldout_features() -> torch.Tensor:
    """Features of the 297 held-out real digits (the `test` split: no model or fitness saw them)."""
    from diffes_pl.data.digits import load_digits_split

    real, _ = load_digits_split("test")
    return features((real + 1) / 2)


def kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID (`kid_unbiased`: torchmetrics' kernel and estimator on all rows, no subset noise) of the
    features standardised by the real set's per-dimension mean and std (`standardise`: why)."""
    return kid_unbiased(*standardise(real, fake))


def row_statistics(feats: torch.Tensor, real: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """A row's KID with its percentile bootstrap interval (`kid_interval`: generated and real rows
    resampled, no row paired with its own copy) and FID (no interval: FID's resampling bias in 128-d
    puts every resample above the estimate, see `bootstrap_interval`; its differences are `compare`'s)."""
    interval = kid_interval(*standardise(real, feats), n_boot=n_boot, seed=seed)
    return {"kid": interval.value, "kid_low": interval.low, "kid_high": interval.high,
            "fid": fid_from_features(real, feats)}


def compare(a: dict, b: dict, real: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """Row a against row b on the same pooled probes: SSIM (per probe), KID and FID decisions.
    a, b: {"ssim_per_probe": [n], "features": [n, d]}."""
    return {"ssim": paired_difference(torch.as_tensor(a["ssim_per_probe"]), torch.as_tensor(b["ssim_per_probe"]),
                                      n_boot=n_boot, seed=seed).to_dict(),
            "kid": kid_difference(*standardise(real, a["features"], b["features"]), n_boot=n_boot,
                                  seed=seed).to_dict(),
            "fid": distribution_difference(real, a["features"], b["features"], fid_from_features, n_boot=n_boot,
                                           seed=seed).to_dict()}


def score_block(context, schedules: dict, num_probes: int, probe_seed: int, real: torch.Tensor,
                metrics: tuple[str, ...] = ("ssim", "psnr")) -> dict[str, dict]:
    """`evaluate_schedules` on one probe block, each row with its digits features and KID / FID
    against `real`: {row: {levels, ssim, psnr, class_accuracy, ssim_per_probe, features, kid, fid, …}}
    (`metrics`: the fitness metrics computed on the block, SSIM among them)."""
    from diffes_pl.search.holdout import evaluate_schedules

    images: dict = {}
    results = evaluate_schedules(context, schedules, num_probes=num_probes, probe_seed=probe_seed,
                                 metrics=metrics, per_probe=("ssim",), images=images)
    for row, result in results.items():
        result["features"] = features(images[row])
        result["images"] = images[row]
        result.update(probe_seed=probe_seed, kid=kid(real, result["features"]),
                      fid=fid_from_features(real, result["features"]))
    return results


def same_images(blocks: dict[str, list[dict]], earlier_rows: dict, what: str) -> None:
    """A rescore scores the very images the report scored: raise if any row's per-block SSIM moved
    (another store, model or probe set), naming the rows and the fix."""
    moved = [row for row in blocks if row in earlier_rows and any(
        abs(blk["ssim"] - e["ssim"]) > 1e-6 for blk, e in zip(blocks[row], earlier_rows[row]["per_seed"]))]
    if moved:
        raise RuntimeError(f"--rescore of {what}: SSIM of {', '.join(moved)} differs from the report's, so these are "
                           "not the images it scored (another store or model?): rerun without --rescore")


def earlier_report(out, rescore: bool) -> dict | None:
    """The report `--rescore` scores again (None without it); SystemExit naming the fix when absent."""
    if not rescore:
        return None
    if not out.exists():
        raise SystemExit(f"--rescore needs the report to score again: {out} does not exist (run without --rescore, "
                         "or name it with --out)")
    return json.loads(out.read_text())


SUMMARISED = ("ssim", "psnr", "class_accuracy", "kid", "fid")


def summarise(blocks: list[dict], real: torch.Tensor, n_boot: int) -> dict:
    """One row over its probe blocks (one per search seed): per block, mean ± std across blocks, and
    pooled (every block's probes together; KID with its bootstrap interval), plus the pooled
    per-probe SSIM and features that `compare` pairs."""
    pooled_ssim = [x for blk in blocks for x in blk["ssim_per_probe"]]
    feats = torch.cat([blk["features"] for blk in blocks])
    finite = [k for k in SUMMARISED if all(math.isfinite(blk[k]) for blk in blocks)]  # dense PSNR is inf
    return {"per_seed": [{k: blk[k] for k in ("probe_seed", *SUMMARISED)} for blk in blocks],
            "across_seeds": {k: across_seeds([blk[k] for blk in blocks]) for k in finite},
            "pooled": {"ssim": sum(pooled_ssim) / len(pooled_ssim), **row_statistics(feats, real, n_boot)},
            "ssim_per_probe": pooled_ssim, "features": feats}


def print_rows(rows: dict, columns: dict[str, Callable[[dict], str]] | None = None) -> None:
    """A table of summarised rows: SSIM and accuracy (mean ± std over seeds), pooled KID [95 % CI],
    FID (mean ± std over seeds), and `columns` {header: row → text} after the name."""
    columns = columns or {}
    print(f"{'schedule':24s} " + " ".join(f"{h:>{max(len(h), 9)}s}" for h in columns) +
          f" {'SSIM':>15s} {'acc %':>6s} {'KID×1e3 [95 % CI]':>22s} {'FID':>13s}")
    for name, row in rows.items():
        a, p = row["across_seeds"], row["pooled"]
        cells = " ".join(f"{fn(row):>{max(len(h), 9)}s}" for h, fn in columns.items())
        print(f"{name:24s} {cells} {a['ssim']['mean']:7.4f}±{a['ssim']['std']:.4f} "
              f"{100 * a['class_accuracy']['mean']:6.1f} {1e3 * p['kid']:7.3f} [{1e3 * p['kid_low']:6.3f},"
              f"{1e3 * p['kid_high']:6.3f}] {a['fid']['mean']:6.2f}±{a['fid']['std']:5.2f}")


def print_decisions(subject: str, decisions: dict) -> None:
    """`compare` results of `subject` against each other row."""
    print(f"{subject} vs:   SSIM Δ [CI] decision | KID×1e3 Δ [CI] decision | FID Δ [CI] decision (pooled probes, 95 %)")
    for other, d in decisions.items():
        s, k, f = d["ssim"], d["kid"], d["fid"]
        print(f"  {other:24s} {s['mean_diff']:+.4f} [{s['low']:+.4f},{s['high']:+.4f}] {s['decision']:4s} | "
              f"{1e3 * k['mean_diff']:+.3f} [{1e3 * k['low']:+.3f},{1e3 * k['high']:+.3f}] {k['decision']:4s} | "
              f"{f['mean_diff']:+.3f} [{f['low']:+.3f},{f['high']:+.3f}] {f['decision']}")


def to_json(rows: dict) -> dict:
    """Rows without their tensors (features), ready for the report."""
    return {name: {k: v for k, v in row.items() if k not in ("features", "images")} for name, row in rows.items()}


def write_report(out: Path, report: dict) -> None:
    """The benchmark's JSON (atomically: a killed run leaves the previous report)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out)
    print("wrote", out)
