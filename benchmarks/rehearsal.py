"""Rehearsal of a real architecture end to end, with random weights (issue 24, part 6).

Builds the denoiser's real architecture from its shipped config with random weights (DiT-XL/2 with an
SD-VAE-shaped random AutoencoderKL, saved as a local DiT folder), writes a small local image folder
(random PNGs, one subfolder per class, read through `datasets`' imagefolder as `data.source`), then
runs the CLI phases in turn, each in its own process:

    predict  calibration → trajectory store
    fit      the search (`--generations` generations; the store of `predict` is reused)
    test     `diffes-pl test`: dense, uniform and searched schedules sampled and compared (SSIM)

Per phase it records wall time, the process's peak host memory (ru_maxrss of that process, read
in-process when the CLI returns) and with `--device cuda` the peak of
`torch.cuda.max_memory_allocated`; the OBS solve lines (`stage s: OBS solve …`) are collected too.
Plan against measurement: the memory plan each CLI process computes (`memory_plan.run_plan`, recorded
in that process) is compared with the process's measured peak less its memory before the CLI ran
(Python, torch, diffusers, Lightning imported: what the plan does not count): predict against the
plan's loading and calibration, fit against its search, test against its sampling.
Writes benchmarks/results/rehearsal_<model>[_wanda]_<device>.json (or --out).

    python benchmarks/rehearsal.py                                  # DiT-XL/2, 2 stages, 4 steps, CPU
    python benchmarks/rehearsal.py --model tiny --stages 2 --steps 4 --out /tmp/r.json   # about a minute
    python benchmarks/rehearsal.py --device cuda                    # on a GPU

Random weights: the figures are time and memory, not quality (the fitness is SSIM to the dense model).
`--model`: dit (DiT-XL/2-256), tiny (the built-in model; its shipped trained weights). The
text-to-image families (sd3, pixart, sdxl) need text encoders the shipped configs do not describe, so
the script refuses them with that reason (not yet built).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"dit": "facebook/DiT-XL-2-256", "tiny": "tiny-digits"}
NOT_YET = {"sd3": "SD3-Medium", "pixart": "PixArt-Σ", "sdxl": "SDXL"}
PHASES = ("predict", "fit", "test")
SOLVE_LINE = re.compile(r"^stage \d+: OBS solve ")  # obs.solve_summary's line, one per stage


# --- inside a phase's own process -------------------------------------------------------------------

class AnonymousPeak:
    """Peak of the process's anonymous resident memory (/proc/self/status RssAnon, sampled every 20 ms
    in a thread): what the process allocated, without the pages of memory-mapped files (the store's
    shards) that ru_maxrss also counts and the kernel may drop. Linux only (0 elsewhere)."""

    def __init__(self) -> None:
        import threading

        self.start = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def _run_phase(argv: list[str], report: Path) -> None:
    """Runs one CLI subcommand in this process, then writes its peaks to `report` (also when the CLI
    exits with an error: the figures of a failed phase are still figures)."""
    code, plans = 0, []
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv as well: the phase's own arguments only
    try:
        import diffes_pl.memory_plan as memory_plan
        from diffes_pl.cli import main

        planned = memory_plan.run_plan

        def recorded(*args, **kwargs):  # the plan the CLI prints and checks, kept as numbers
            plan = planned(*args, **kwargs)
            plans.append({phase: {place: plan.total(phase, place) for place in ("accelerator", "host")}
                          for phase in plan.phases})
            return plan

        memory_plan.run_plan = recorded
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports done, nothing run
        anonymous = AnonymousPeak()
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        peaks = {"peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
                 "baseline_host_bytes": locals().get("baseline", 0)}
        if "anonymous" in locals():
            peaks["baseline_anonymous_bytes"], peaks["peak_anonymous_bytes"] = anonymous.start, anonymous.stop()
        if plans:
            peaks["plan"] = plans[-1]
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peaks["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
                peaks["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        report.write_text(json.dumps({**peaks, "exit_code": code}))
    sys.exit(code)


def _build_model(model: str, folder: Path) -> dict:
    """The architecture with random weights, saved as a local diffusers DiT folder; returns its sizes."""
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from diffes_pl.denoisers.assets import asset_path

    torch.manual_seed(0)
    config = json.loads(asset_path("dit_xl_2_256_config.json").read_text())
    config.pop("_class_name", None)
    denoiser = DiTTransformer2DModel(**config)
    denoiser.save_pretrained(folder / "transformer")
    # SD's VAE (stabilityai/sd-vae-ft-ema, what DiT ships): 4 resolutions, 4 latent channels, random weights
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
    vae.save_pretrained(folder / "vae")
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {"denoiser_parameters": count(denoiser), "vae_parameters": count(vae)}


def _write_images(folder: Path, n: int, size: int, classes: int = 2) -> None:
    """`n` random RGB PNGs of size × size in `classes` subfolders (imagefolder's labels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class_{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")


# --- the driver ----------------------------------------------------------------------------------------

def _config(args: argparse.Namespace, denoiser: str, images: Path, run: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
                    "max_epochs": args.generations, "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(run)},
        "model": {"denoiser": denoiser,
                  "pruner": {"class_path": f"diffes_pl.pruners.{args.pruner}",
                             "init_args": {"mode": "fast"} if args.pruner == "OBSPruner" else {}},
                  "num_stages": args.stages, "steps": args.steps, "sampler": "ddim", "guidance": 1.5,
                  "sparsity": 0.5, "offspring": 2, "survivors": 2, "max_move": 2, "init": "hybrid",
                  "metric": "ssim", "num_probes": args.probes, "probe_seed": 1234, "dtype": "float32",
                  "calibrate_by": args.calibrate_by},
        "data": {"source": str(images), "image_column": "image", "label_column": "label",
                 "nsamples": args.nsamples, "batch_size": min(args.nsamples, 8), "seed": 0},
    }


PLANNED = {"predict": ("loading", "calibration: gathering", "calibration: solving"), "fit": ("search",),
           "test": ("sampling",)}


def _plan_vs_measured(phases: dict, device: str) -> dict:
    """Per CLI phase, the plan's peak over the phases it runs (predict: loading and calibration; fit:
    the search; test: sampling) against the measured peak less the process's baseline (host; on a CPU
    run the plan counts every row there), and on a GPU the accelerator's against
    torch.cuda.max_memory_allocated."""
    out = {}
    for name, planned_phases in PLANNED.items():
        row, plan = phases.get(name, {}), phases.get(name, {}).get("plan")
        if not plan:
            continue
        places = {"host": row["peak_host_bytes"] - row["baseline_host_bytes"]}
        if row.get("peak_anonymous_bytes"):  # without the memory-mapped store's pages
            places["host, anonymous"] = row["peak_anonymous_bytes"] - row["baseline_anonymous_bytes"]
        if device == "cuda" and "peak_gpu_allocated_bytes" in row:
            places["accelerator"] = row["peak_gpu_allocated_bytes"]
        for place, measured in places.items():
            planned = max(plan.get(p, {}).get(place.split(",")[0], 0) for p in planned_phases)
            if planned:
                out.setdefault(name, {})[place] = {"planned_bytes": planned, "measured_bytes": measured,
                                                   "ratio": round(measured / planned, 3)}
    return out


def _phase(name: str, cmd: list[str], work: Path, env: dict, log) -> dict:
    report = work / f"{name}.peaks.json"
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - start
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    peaks = json.loads(report.read_text()) if report.exists() else {}
    row = {"seconds": round(seconds, 2), **peaks, "returncode": proc.returncode}
    solves = [ln.strip() for ln in proc.stdout.splitlines() if SOLVE_LINE.match(ln.strip())]
    if solves:
        row["obs_solve_lines"] = solves
    log(f"{name}: {seconds:.1f} s, peak host {peaks.get('peak_host_bytes', 0) / 2**30:.2f} GiB"
        + (f", peak GPU {peaks['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB" if "peak_gpu_allocated_bytes" in peaks else "")
        + (f", exit {proc.returncode}" if proc.returncode else ""))
    for line in solves:
        log(f"  {line}")
    if proc.returncode != 0:
        raise SystemExit(f"rehearsal: phase {name} failed (exit {proc.returncode}); its output: {work / (name + '.log')}\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit", choices=[*MODELS, *NOT_YET], help="architecture to rehearse")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--pruner", default="OBSPruner", choices=["OBSPruner", "WandaPruner"],
                    help="OBS (the solve the issue times) or Wanda (no solve: the rest of the pipeline alone)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="sampling steps (≥ stages)")
    ap.add_argument("--nsamples", type=int, default=4, help="calibration images")
    ap.add_argument("--images", type=int, default=16, help="images written to the local folder")
    ap.add_argument("--probes", type=int, default=2, help="search probes")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=4, help="images per schedule in `diffes-pl test`")
    ap.add_argument("--calibrate-by", default="block", choices=["auto", "model", "block"],
                    help="whole-model or block-by-block calibration (model.calibrate_by)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/rehearsal_<model>[_wanda]_<device>.json")
    ap.add_argument("--_phase", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--_report", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._phase is not None:  # a child: one CLI subcommand
        _run_phase(args._phase, args._report)
    if args._build is not None:  # a child: the random-weight model
        sizes = _build_model(args.model, args._build)
        sizes["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (args._build / "sizes.json").write_text(json.dumps(sizes))
        return
    if args.model in NOT_YET:
        raise SystemExit(f"rehearsal: --model {args.model} ({NOT_YET[args.model]}) is not built yet: its pipeline "
                         "needs text encoders whose shapes the shipped denoiser config does not give; "
                         f"use --model {' or '.join(MODELS)}")
    if args.steps < args.stages:
        raise SystemExit(f"rehearsal: --steps {args.steps} must be ≥ --stages {args.stages}")

    import yaml

    pruner_tag = "" if args.pruner == "OBSPruner" else "_" + args.pruner.removesuffix("Pruner").lower()
    out = args.out or ROOT / "benchmarks" / "results" / f"rehearsal_{args.model}{pruner_tag}_{args.device}.json"
    with tempfile.TemporaryDirectory(prefix="diffes-rehearsal-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "HF_DATASETS_CACHE": str(work / "hf-datasets")}
        me = [sys.executable, str(Path(__file__).resolve())]
        result: dict = {"model": args.model, "architecture": MODELS[args.model], "device": args.device,
                        "pruner": args.pruner, "settings": {k: getattr(args, k) for k in (
                            "stages", "steps", "nsamples", "images", "probes", "generations", "eval_images",
                            "calibrate_by")},
                        "phases": {}}
        log = lambda line: print(line, flush=True)

        images = work / "images"
        size = 256 if args.model == "dit" else 32
        _write_images(images, args.images, size)
        if args.model == "tiny":
            denoiser = MODELS["tiny"]
        else:
            start = time.perf_counter()
            folder = work / "model"
            proc = subprocess.run([*me, "--model", args.model, "--_build", str(folder)], check=False, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"rehearsal: building the model failed:\n{proc.stderr[-3000:]}")
            sizes = json.loads((folder / "sizes.json").read_text())
            result["phases"]["build"] = {"seconds": round(time.perf_counter() - start, 2),
                                         "peak_host_bytes": sizes.pop("peak_host_bytes")}
            result.update(sizes)
            log(f"build: {result['phases']['build']['seconds']:.1f} s → {folder}")
            denoiser = str(folder)
        config = work / "config.yaml"
        run = work / "run"
        config.write_text(yaml.safe_dump(_config(args, denoiser, images, run), sort_keys=False))

        evaluation = ["--eval.num_images", str(args.eval_images), "--eval.batch_size", str(min(args.eval_images, 4)),
                      "--eval.metrics", "[ssim]", "--eval.latency_batch_size", "0"]
        for name in PHASES:
            cli = [name, "--config", str(config), *(evaluation if name == "test" else [])]
            cmd = [*me, "--_report", str(work / f"{name}.peaks.json"), "--_phase", *cli]
            result["phases"][name] = _phase(name, cmd, work, env, log)

        result["plan_vs_measured"] = _plan_vs_measured(result["phases"], args.device)
        result["evaluation"] = json.loads((run / "evaluation.json").read_text())["results"]  # {row: {metric: value}}
        schedule = json.loads((run / "schedule.json").read_text())
        result["schedule_levels"] = schedule["levels"]
        result["peak_host_bytes"] = max(p.get("peak_host_bytes", 0) for p in result["phases"].values())
        gpu = [p["peak_gpu_allocated_bytes"] for p in result["phases"].values() if "peak_gpu_allocated_bytes" in p]
        if gpu:
            result["peak_gpu_allocated_bytes"] = max(gpu)
        result["total_seconds"] = round(sum(p["seconds"] for p in result["phases"].values()), 2)
        result["machine"] = {"device": args.device, "cpus": len(os.sched_getaffinity(0)), "cpu": platform.processor(),
                             "python": platform.python_version(), "load_average_at_end": os.getloadavg()}
        if args.device == "cpu":
            result["machine"]["note"] = f"CPU only, {result['machine']['cpus']} cores, shared/loaded machine"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"total {result['total_seconds']:.1f} s, peak host {result['peak_host_bytes'] / 2**30:.2f} GiB → {out}")


if __name__ == "__main__":
    main()
