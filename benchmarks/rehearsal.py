"""Rehearsal of a real architecture end to end, with random weights (issue 24, part 6).

Builds the denoiser's real architecture from its shipped config with random weights and saves it as a
local diffusers folder (`model.denoiser: <folder>`):
- dit: DiT-XL/2-256 with an SD-VAE-shaped random AutoencoderKL (a DiT folder);
- pixart / sd3 / sdxl: PixArt-Σ XL/2, SD3-Medium's MMDiT, SDXL-base's UNet at full size (every weight
  of the shipped config; only `sample_size` is lowered, for 256 × 256 images, which no weight depends
  on), an SD-shaped random VAE of the family's latent channels and random text encoders whose OUTPUT
  widths are the real pipeline's (PixArt: T5 4096 = caption_channels; SD3: CLIP-L 768 + CLIP-G 1280
  with projections = pooled 2048, T5 4096 = joint_attention_dim; SDXL: CLIP-L 768 + CLIP-G 1280 =
  cross_attention_dim 2048, CLIP-G's projection 1280 = the pooled input) but only 2 layers deep (T5
  with 8 heads of 64 and MLP 2048): the denoiser sees only their output widths. Tokenizers are
  word-level ones built offline (`word_tokenizer`; CLIP padded to 77 tokens, T5 to the adapter's
  text_len: 300 / 256). The folder is the family's pipeline folder (model_index.json).
It writes a small local image folder (random PNGs read through `datasets`' imagefolder as
`data.source`: one subfolder per class, or for the text families one folder with a metadata.jsonl
`text` caption per image; the search probes prompts), then runs the CLI phases in turn, each in its
own process:

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

    python benchmarks/rehearsal.py --model pixart --stages 2 --steps 4 --probes 1 --generations 1
    python benchmarks/rehearsal.py --model sd3 --stages 1 --steps 2 --levels 10 --probes 1 --generations 1
    python benchmarks/rehearsal.py --model sdxl --dtype bfloat16 --calibrate-by model --stat-dtype float32 \
        --stages 1 --steps 2 --probes 1 --generations 1

Random weights: the figures are time and memory, not quality (the fitness is SSIM to the dense model).
`--model`: dit (DiT-XL/2-256), tiny (the built-in model; its shipped trained weights), pixart, sd3,
sdxl (text-to-image, as above). `--dtype bfloat16` runs the CLI phases in bfloat16 (the folder is
saved in float32). On a 24 GB CPU host, by the memory plan at 256 pixels, 1 stage, H = 10: SD3-Medium
in float32 plans 10.7 GiB (`--levels 10`: its default H = 24 writes a 21 GiB store per stage); the
SDXL UNet's transformer blocks do not run one after another, so `--calibrate-by block` re-runs the
forward once per block (70 predict epochs a stage), and whole-model statistics in float64 beside
float32 weights plan 34.9 GiB: hence bfloat16 weights and float32 statistics (18.0 GiB, which fits a
24 GB host only with little else running; on this 2-core CPU its calibration did not finish within a
session, so no SDXL figures are recorded).
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
MODELS = {"dit": "facebook/DiT-XL-2-256", "tiny": "tiny-digits",
          "pixart": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
          "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
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


# Words of the calibration captions and probe prompts: the offline word-level tokenizers know these
# (no tokenizer can be downloaded); anything else is [UNK], which a random-weight run does not mind.
WORDS = ("a an the of on in with at by near photo painting cat dog bird horse man woman astronaut bicycle bowl "
         "fruit lighthouse table street wall kitchen coast red blue green wooden brick rocky sits stands runs "
         "riding leaning mars rain morning light sunset oil").split()
CAPTIONS = ["a red cat sits on the table", "a dog runs in the street", "a photo of a blue bird",
            "a man with a green bicycle", "the woman stands near the wall", "a horse on the rocky coast",
            "a bowl of fruit on a wooden table", "a lighthouse at sunset, oil painting"]
PROMPTS = ["a photo of an astronaut riding a horse on mars",
           "a red bicycle leaning against a brick wall in the rain"]
# Per text-to-image family: the denoiser's shipped config, the pipeline class of the folder, the
# denoiser's subfolder, the sample size (latent side) the rehearsal uses instead of the shipped one
# (CPU: 256 × 256 images; weights do not depend on it), and the text encoders built for it. Widths
# are the real pipeline's (they are what the denoiser takes); depth is 2 layers and T5's attention/MLP
# are narrow, since the denoiser only sees the encoders' output widths.
TEXT_FAMILIES = {
    "pixart": {"config": "pixart_sigma_xl_2_1024_ms_transformer_config.json", "pipeline": "PixArtSigmaPipeline",
               "sub": "transformer", "denoiser": "PixArtTransformer2DModel", "image_size": 256,
               "encoders": [("T5", "text_encoder", "tokenizer", {"width": "caption_channels"})],
               "vae": {"latent_channels": 4, "scaling_factor": 0.13025}},  # SDXL's VAE (what Σ ships)
    "sd3": {"config": "sd3_medium_transformer_config.json", "pipeline": "StableDiffusion3Pipeline",
            "sub": "transformer", "denoiser": "SD3Transformer2DModel", "image_size": 256,
            # CLIP-L 768 + CLIP-G 1280: pooled 2048 = pooled_projection_dim, hidden padded to T5's 4096
            "encoders": [("CLIPProj", "text_encoder", "tokenizer", {"width": 768}),
                         ("CLIPProj", "text_encoder_2", "tokenizer_2", {"width": 1280}),
                         ("T5", "text_encoder_3", "tokenizer_3", {"width": "joint_attention_dim"})],
            "vae": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                    "use_quant_conv": False, "use_post_quant_conv": False}},
    "sdxl": {"config": "sdxl_base_unet_config.json", "pipeline": "StableDiffusionXLPipeline", "sub": "unet",
             "denoiser": "UNet2DConditionModel", "image_size": 256,
             # CLIP-L 768 + CLIP-G 1280 = cross_attention_dim 2048; CLIP-G's projection 1280 = the pooled input
             "encoders": [("CLIP", "text_encoder", "tokenizer", {"width": 768}),
                          ("CLIPProj", "text_encoder_2", "tokenizer_2", {"width": 1280})],
             "vae": {"latent_channels": 4, "scaling_factor": 0.13025}},
}
ENCODER_LAYERS = 2
SD_VAE = {"in_channels": 3, "out_channels": 3, "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def word_tokenizer(max_length: int):
    """The offline word-level tokenizer of `WORDS` (`denoisers.text.word_tokenizer`, as the tests build theirs)."""
    from diffes_pl.denoisers.text import word_tokenizer as build

    return build(WORDS, max_length)


def _text_encoder(kind: str, width: int, vocab: int, tiny: bool):
    """A random CLIP text encoder (77 positions, heads of 64) or T5 encoder of hidden size `width`,
    ENCODER_LAYERS deep; T5's attention (8 heads of 64) and MLP (2048) are narrow: only its output width
    reaches the denoiser."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    heads = 2 if tiny else max(1, width // 64)
    if kind == "T5":
        return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8 if tiny else 64,
                                       d_ff=2 * width if tiny else 2048, num_layers=ENCODER_LAYERS,
                                       num_heads=heads if tiny else 8, pad_token_id=0, eos_token_id=2))
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=ENCODER_LAYERS, num_attention_heads=heads, max_position_embeddings=77,
                         projection_dim=width, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    return (CLIPTextModelWithProjection if kind == "CLIPProj" else CLIPTextModel)(cfg)


def _build_model(model: str, folder: Path, tiny: dict | None = None) -> dict:
    """The architecture with random weights, saved as a local diffusers folder; returns its sizes.

    dit: DiTTransformer2DModel + an SD-VAE-shaped AutoencoderKL. pixart / sd3 / sdxl: the shipped
    denoiser config (sample_size lowered to 256-pixel images; no weight depends on it), an SD-shaped VAE
    of the family's latent channels, random text encoders of the widths the denoiser takes and offline
    word-level tokenizers, saved as the family's diffusers pipeline folder (`model_index.json`).
    `tiny` (tests only): overrides of the denoiser config and encoder widths, same code path."""
    import torch

    from diffes_pl.denoisers.assets import asset_path

    torch.manual_seed(0)
    count = lambda m: sum(p.numel() for p in m.parameters())
    if model == "dit":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        config = json.loads(asset_path("dit_xl_2_256_config.json").read_text())
        config.pop("_class_name", None)
        denoiser = DiTTransformer2DModel(**config)
        denoiser.save_pretrained(folder / "transformer")
        # SD's VAE (stabilityai/sd-vae-ft-ema, what DiT ships): 4 resolutions, 4 latent channels, random weights
        vae = AutoencoderKL(**SD_VAE, latent_channels=4, sample_size=256, scaling_factor=0.18215)
        vae.save_pretrained(folder / "vae")
        return {"denoiser_parameters": count(denoiser), "vae_parameters": count(vae)}
    import diffusers
    from diffusers import AutoencoderKL

    spec = TEXT_FAMILIES[model]
    tiny = tiny or {}
    config = {k: v for k, v in json.loads(asset_path(spec["config"]).read_text()).items() if not k.startswith("_")}
    config.update(tiny.get("denoiser", {}))
    vae_kwargs = {**SD_VAE, **spec["vae"], **tiny.get("vae", {})}
    factor = 2 ** (len(vae_kwargs["block_out_channels"]) - 1)
    image_size = tiny.get("image_size", spec["image_size"])
    if model != "sd3":  # PixArt and SDXL take the latent side from sample_size; SD3 from the VAE's
        config["sample_size"] = image_size // factor
    denoiser = getattr(diffusers, spec["denoiser"]).from_config(config)
    denoiser.save_pretrained(folder / spec["sub"])
    vae = AutoencoderKL(**vae_kwargs, sample_size=image_size, force_upcast=model != "sd3")
    vae.save_pretrained(folder / "vae")
    sizes = {"denoiser_parameters": count(denoiser), "vae_parameters": count(vae), "image_size": image_size,
             "latent_side": image_size // factor, "text_encoders": {}}
    for kind, enc_dir, tok_dir, dims in spec["encoders"]:
        width = dims["width"]
        width = int(config[width]) if isinstance(width, str) else int(tiny.get("widths", {}).get(enc_dir, width))
        tok = word_tokenizer(77 if kind.startswith("CLIP") else 512)  # T5: padded to the adapter's text_len
        encoder = _text_encoder(kind, width, len(tok), bool(tiny))
        tok.save_pretrained(folder / tok_dir)
        encoder.save_pretrained(folder / enc_dir)
        sizes["text_encoders"][enc_dir] = {"class": type(encoder).__name__, "hidden_size": width,
                                           "layers": ENCODER_LAYERS, "parameters": count(encoder)}
    _check_widths(model, config, sizes["text_encoders"])
    (folder / "model_index.json").write_text(json.dumps({"_class_name": spec["pipeline"]}))
    return sizes


def _check_widths(model: str, config: dict, encoders: dict) -> None:
    """Refuses encoders whose output widths the denoiser would not take (before a long run finds out)."""
    widths = [e["hidden_size"] for e in encoders.values()]
    if model == "sd3":
        ok = widths[0] + widths[1] == config["pooled_projection_dim"] and widths[2] == config["joint_attention_dim"] \
            and widths[0] + widths[1] <= widths[2]
    elif model == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        ok = sum(widths) == config["cross_attention_dim"] and widths[1] == pooled
    else:
        ok = widths == [config["caption_channels"]]
    if not ok:
        raise ValueError(f"rehearsal: {model} text encoder widths {widths} do not fit the denoiser config")


def _write_images(folder: Path, n: int, size: int, classes: int = 2, captions: list[str] | None = None) -> None:
    """`n` random RGB PNGs of size × size: in `classes` subfolders (imagefolder's labels), or with
    `captions` in one folder whose metadata.jsonl gives each image its caption (imagefolder's `text`)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sub = folder if captions else folder / f"class_{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")
        if captions:
            rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": captions[i % len(captions)]}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


# --- the driver ----------------------------------------------------------------------------------------

def _config(args: argparse.Namespace, denoiser: str, images: Path, run: Path) -> dict:
    text = args.model in TEXT_FAMILIES
    data = ({"caption_column": "text", "label_column": None} if text else {"label_column": "label"})
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
                    "max_epochs": args.generations, "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(run)},
        "model": {"denoiser": denoiser,
                  "pruner": {"class_path": f"diffes_pl.pruners.{args.pruner}",
                             "init_args": {**({"mode": "fast"} if args.pruner == "OBSPruner" else {}),
                                           **({"stat_dtype": args.stat_dtype} if args.stat_dtype else {})}},
                  **({"levels": args.levels} if args.levels else {}),
                  "num_stages": args.stages, "steps": args.steps, "sampler": "flow_euler" if args.model == "sd3" else "ddim", "guidance": 1.5,
                  "sparsity": 0.5, "offspring": 2, "survivors": 2, "max_move": 2, "init": "hybrid",
                  "metric": "ssim", "num_probes": args.probes, "probe_seed": 1234, "dtype": args.dtype,
                  "calibrate_by": args.calibrate_by, **({"prompts": PROMPTS} if text else {})},
        "data": {"source": str(images), "image_column": "image", **data,
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
    ap.add_argument("--model", default="dit", choices=list(MODELS), help="architecture to rehearse")
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
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model.dtype of the CLI phases (the folder is saved in float32)")
    ap.add_argument("--levels", type=int, default=None, help="model.levels (H; default: the pruner's)")
    ap.add_argument("--stat-dtype", default=None, choices=["float64", "float32"],
                    help="the pruner's stat_dtype (default: its own, float64)")
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
                            "calibrate_by", "dtype", "levels", "stat_dtype")},
                        "phases": {}}
        log = lambda line: print(line, flush=True)

        images = work / "images"
        size = 32 if args.model == "tiny" else 256
        text = args.model in TEXT_FAMILIES
        _write_images(images, args.images, size, captions=CAPTIONS if text else None)
        result["image_size"] = size
        if text:
            result["random_parts"] = (
                "denoiser (full shipped architecture, sample_size lowered for 256-pixel images), SD-shaped VAE, "
                f"text encoders of the real output widths but {ENCODER_LAYERS} layers (T5: 8 heads of 64, MLP 2048) "
                "and offline word-level tokenizers")
            result["prompts"] = PROMPTS
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
