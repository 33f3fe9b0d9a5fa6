"""`diffes-pl test`: samples N images with the searched schedule (routed), the uniform schedule at
the same budget and the dense model, then reports FID, IS, precision/recall, SSIM vs dense (same
seeds), MACs and latency per image. Writes <run>/evaluation.json atomically and prints a table.

Images are sampled resumably under <run>/eval/ (see `evaluation.generate`); the dense model's images
do not depend on the schedule and are reused by every later evaluation with the same settings.
Feature network and real images: what the adapter declares (`evaluation_reference`; the built-in
model: the digits classifier and the held-out real digits), else torch-fidelity's Inception and
`reference` (a tensor file or a folder).

Everything about the run — its folder, store, denoiser, partition and sampling settings — comes from
the `RunContext` (`DiffES.context`); this module imports nothing of the search.
"""
from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..caching.budget import trajectory_macs
from ..caching.installed import install_schedule
from ..macs import schedule_kernel_macs
from ..io import write_json
from ..routing import check_routable, check_store
from ..run import RunContext
from ..schedule import Schedule
from ..trajectory import StoreMismatchError, TrajectoryStore

METRICS = ("fid", "is", "precision_recall", "ssim", "class_accuracy", "clip")


@dataclass
class EvalConfig:
    """What `diffes-pl test`, the EvaluateAtFitEnd callback and benchmarks/compare.py measure.

    Args:
        num_images: images sampled per schedule (and for the dense model).
        batch_size: images per sampling batch (one file per batch under <run>/eval/).
        seed: seeds the evaluation noise (batch b: seed·1_000_003 + b); not the search's probes.
        metrics: any of fid, is, precision_recall, ssim, class_accuracy (where the denoiser's declared
            reference classifies its classes: the built-in model), clip (prompts only).
        latency_batch_size: batch size latency per image is measured at (0: skip latency).
        latency_repeats: timed sampling runs (median), after one warm-up.
        reference: real images: `digits-test`, a tensor file or an image folder (default: the
            denoiser's declared reference — digits-test for the built-in model; required otherwise).
        feature_network: `digits` or `inception` (default: the declared reference's, else inception).
        cache_dir: where real-image features are cached (default <run>/eval/reference).
        prompts: text file, one prompt per line (text-to-image models; CLIP score).
        uniform: also evaluate the uniform schedule at the same budget (integer targets only).
    """

    num_images: int = 1000
    batch_size: int = 100
    seed: int = 2024
    metrics: list[str] = field(default_factory=lambda: ["fid", "is", "precision_recall", "ssim", "class_accuracy"])
    latency_batch_size: int = 16
    latency_repeats: int = 3
    reference: str | None = None
    feature_network: str | None = None
    cache_dir: str | None = None
    prompts: str | None = None
    uniform: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown evaluation metrics {unknown}; choose from {list(METRICS)}")
        if self.num_images < 2 or self.batch_size < 1:
            raise ValueError(f"num_images must be ≥ 2 and batch_size ≥ 1 (got {self.num_images}, {self.batch_size})")


def _fingerprint(adapter) -> str:
    """Identity + a hash of the first and last parameter (cheap): cached images are keyed to the weights."""
    params = list(adapter.denoiser.parameters())
    h = hashlib.sha256(repr(adapter.identity()).encode())
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate(context: RunContext, trainer, schedules: dict[str, Schedule | None], config: EvalConfig,
             run: str | Path, log: Callable[[str], None] = print, launched: bool = False,
             store: TrajectoryStore | None = None) -> dict:
    """Rows {name: {levels, sparsity, macs, mac_ratio, latency_s, speedup, fid, is, …}} for the dense
    model (name `dense`, always included) and each schedule, sampled as the run `context` samples
    (default store: the run's). Sampling is split across the trainer's ranks (`launched`: the ranks
    already run, e.g. inside fit; see `ensure_images`); metrics are computed on rank 0 (other ranks
    return {})."""
    from .generate import ImageSet, ensure_images, latency_times

    run = Path(run)
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    adapter, partition = context.adapter, context.partition
    adapter.denoiser.to(device)
    routed = {n: s for n, s in schedules.items() if s is not None}
    if store is None and routed:
        store = context.store
    prompts = Path(config.prompts).read_text().splitlines() if config.prompts else (list(context.prompts or []) or None)
    if prompts is None and adapter.conditioning == "text":
        raise ValueError("this denoiser is prompt-conditioned: give prompts (a text file, one per line)")
    kw = dict(sampler=context.sampler, steps=context.steps, guidance=context.guidance)
    base = {**kw, "seed": config.seed, "batch_size": config.batch_size, "denoiser": _fingerprint(adapter),
            "dtype": context.dtype,
            "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None}
    sets = {}
    for name, schedule in {"dense": None, **routed}.items():
        settings = base if schedule is None else {**base, "store": store.key, "partition": schedule.partition}
        if schedule is not None and schedule.caches:  # cached images differ: key them to the cache too
            settings = {**settings, "cache_intervals": schedule.intervals, "cache_branch": schedule.cache_branch}
        sets[name] = ImageSet(run / "eval", name, None if schedule is None else schedule.levels, settings,
                              config.num_images, prompts)
        sampled = ensure_images(sets[name], adapter, store, schedule, trainer=trainer, launched=launched, **kw)
        log(f"evaluation images {name}: {sampled} batches sampled now, "
            f"{sets[name].num_batches - sampled} already on disk → {sets[name].folder}")
    if trainer is not None and trainer.global_rank != 0:
        return {}
    images = {name: s.load() for name, s in sets.items()}
    for name, image_set in sets.items():  # for people and other FID tools: PNGs of exactly these images
        image_set.write_pngs()
        log(f"evaluation images {name} as PNG: {image_set.png_folder} ({image_set.num_images}), "
            f"grid {image_set.folder / 'grid.png'}")
    metrics = _image_metrics(adapter, images, sets["dense"], config, run, prompts, log)
    rows = {}
    for name, schedule in {"dense": None, **routed}.items():
        with install_schedule(adapter, store, schedule) as installed:
            macs = trajectory_macs(adapter, schedule, partition, router=installed.router)
            # sparse weights: what a 2:4 kernel would execute (only 2:4-patterned layers gain)
            kernel = None
            if store is not None and store.sparse:
                kernel = macs if schedule is None else schedule_kernel_macs(adapter, installed.router, partition)
            times = latency_times(adapter, installed.router, batch_size=config.latency_batch_size,
                                  repeats=config.latency_repeats, cache=installed.cache,
                                  **kw) if config.latency_batch_size else None
        rows[name] = {"levels": None if schedule is None else schedule.levels,
                      **({"intervals": schedule.intervals} if schedule is not None and schedule.caches else {}),
                      "sparsity": 0.0 if schedule is None else schedule.sparsity,
                      "macs": macs, **({"macs_2of4_kernel": kernel} if kernel is not None else {}),
                      "latency_s": statistics.median(times) if times else None,
                      "latency_runs_s": times, **metrics[name]}
    for row in rows.values():
        row["mac_ratio"] = rows["dense"]["macs"] / row["macs"]
        row["speedup"] = rows["dense"]["latency_s"] / row["latency_s"] if row["latency_s"] else None
    return rows


def _image_metrics(adapter, images: dict, dense_set, config: EvalConfig, run: Path, prompts, log) -> dict:
    from . import metrics as M

    want = set(config.metrics)
    declared = adapter.evaluation_reference  # what the family's samples are compared with by default
    out = {name: {} for name in images}
    if want & {"fid", "is", "precision_recall"}:
        from .features import feature_network, real_features

        net = feature_network(config.feature_network or (declared.feature_network if declared else "inception"))
        reference = config.reference or (declared.images if declared else None)
        if reference is None:
            raise ValueError("FID/precision-recall need real reference images: set the reference (a tensor file "
                             "of images [N, C, H, W] in [0, 1] or an image folder), or drop fid/precision_recall")
        real = real_features(reference, images["dense"].shape[-1], net, config.cache_dir or run / "eval" / "reference",
                             log=log)
        for name, x in images.items():
            fake = net.extract(x)
            if "fid" in want:
                out[name]["fid"] = M.fid_from_features(real["features"], fake["features"])
            if "is" in want:
                out[name]["is"], out[name]["is_std"] = M.inception_score(fake["logits"])
            if "precision_recall" in want:
                out[name]["precision"], out[name]["recall"] = M.precision_recall(real["features"], fake["features"])
    if "ssim" in want:
        for name, x in images.items():
            out[name]["ssim"] = M.ssim(x, images["dense"])
    if "class_accuracy" in want and declared is not None and "class_accuracy" in declared.metrics:
        from .digits_features import class_accuracy

        labels = torch.cat([dense_set.conditions(b, adapter.num_classes) for b in range(dense_set.num_batches)])
        for name, x in images.items():
            out[name]["class_accuracy"] = class_accuracy(x, labels[:len(x)])
    if "clip" in want and prompts is not None:
        from .clip import CLIPScoreAdapter

        clip = CLIPScoreAdapter()
        for name, x in images.items():
            out[name]["clip"] = clip(x, [prompts[i % len(prompts)] for i in range(len(x))])
    return out


COLUMNS = [("sparsity", "sparsity", "{:.1%}"), ("macs", "MACs", None), ("macs_2of4_kernel", "MACs, 2:4 kernel", None), ("latency_s", "latency/img", "{:.4f}s"),
           ("speedup", "speedup", "{:.2f}×"), ("is", "IS", "{:.2f}"), ("fid", "FID", "{:.3f}"),
           ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"), ("ssim", "SSIM", "{:.4f}"),
           ("class_accuracy", "class acc", "{:.1%}"), ("clip", "CLIP", "{:.2f}")]


def _macs(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def table_cells(rows: dict) -> tuple[list[str], list[list[str]]]:
    """The evaluation table as text: headers, and one row of cells per schedule, columns shaped like
    the paper's Table 1 (those no row has left out)."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows.values())]
    body = []
    for name, row in rows.items():
        cells = []
        for key, _, fmt in present:
            value = row.get(key)
            cells.append("" if value is None else _macs(value) if fmt is None else fmt.format(value))
        levels = "dense" if row.get("levels") is None else " ".join(map(str, row["levels"]))
        if row.get("intervals") is not None:  # a cached schedule: levels / cache intervals
            levels += " / k " + " ".join(map(str, row["intervals"]))
        body.append([name, levels, *cells])
    return ["schedule", "levels", *(header for _, header, _ in present)], body


def table_markdown(rows: dict, title: str = "evaluation") -> str:
    """The evaluation table in Markdown (what TensorBoard's text tab renders)."""
    headers, body = table_cells(rows)
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def print_table(rows: dict, title: str = "evaluation") -> None:
    """A rich table, one row per schedule (`table_cells`)."""
    from rich.console import Console
    from rich.table import Table

    headers, body = table_cells(rows)
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i >= 2 else "left")
    for cells in body:
        table.add_row(*cells)
    Console(width=200).print(table)


def evaluate_schedule(context: RunContext, trainer, searched: Schedule, config: EvalConfig, run: str | Path,
                      log: Callable[[str], None] = print, launched: bool = False, source: str = "",
                      store: TrajectoryStore | None = None) -> dict:
    """The schedule, the uniform schedule at its budget (`config.uniform`) and the dense model;
    writes <run>/evaluation.json atomically and prints the table (rank 0). Returns the JSON content.
    `store`: the trajectory store to route with (default: the run's)."""
    run = Path(run)
    if store is None:
        store = context.store
    check_store(searched, store)  # before any image is sampled
    schedules: dict[str, Schedule | None] = {"searched": searched}
    if config.uniform and float(searched.target_level).is_integer():
        schedules["uniform"] = Schedule.uniform(int(searched.target_level), searched.levels_max,
                                                searched.steps_per_stage, partition=searched.partition)
    from .latency import latency_warnings

    rows = evaluate(context, trainer, schedules, config, run, log=log, launched=launched, store=store)
    if not rows:
        return rows
    # what was evaluated: the schedule (file and levels) and the store that routed it
    result = {"schedule": source or searched.levels, "levels": searched.levels, "store": str(store.path),
              "store_key": store.key, "pruner": store.pruner, "config": asdict(config), "results": rows,
              "warnings": latency_warnings(rows)}
    write_json(run / "evaluation.json", result)
    title = f"{source or 'searched schedule'} — {config.num_images} images per row"
    log_to_loggers(trainer, result, title, run / "evaluation.json")
    print_table(rows, title=title)
    for warning in result["warnings"]:
        log(f"warning: {warning}")
    log(f"wrote {run / 'evaluation.json'}")
    return result


def log_to_loggers(trainer, result: dict, title: str = "evaluation", path: Path | None = None) -> None:
    """evaluation.json's numbers to the trainer's loggers (CSV, TensorBoard, …) as `eval/<row>/<metric>`
    (e.g. eval/searched/fid), what was evaluated as hyperparameters, and the table as `eval/table`
    (TensorBoard: its text; other loggers: the path of evaluation.json, `path`)."""
    from .to_loggers import log_text

    loggers = list(trainer.loggers) if trainer is not None else []
    if not loggers:
        return
    metrics = {f"eval/{name}/{key}": float(value) for name, row in result["results"].items()
               for key, value in row.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    what = {"eval/" + key: str(result.get(key)) for key in ("schedule", "levels", "store", "pruner")}
    what["eval/num_images"] = result["config"]["num_images"]
    for logger in loggers:
        logger.log_hyperparams(what)
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    log_text(trainer, "eval/table", table_markdown(result["results"], title), path or Path("evaluation.json"))


def evaluate_run(context: RunContext, trainer, schedule: str | Path | None = None,
                 config: EvalConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """`diffes-pl test`: the schedule file (default <run folder>/schedule.json); its folder receives
    eval/ and evaluation.json."""
    path = schedule_path(context.root_dir, schedule)
    loaded, store = check_schedule_file(path, context.store_path, context.adapter.identity())
    log(f"evaluating {path} on the trajectory store {store.path} (pruner {store.pruner})")
    return evaluate_schedule(context, trainer, loaded, config or EvalConfig(), path.parent, log=log,
                             source=str(path), store=store)


def schedule_path(root_dir: str | Path, schedule: str | Path | None) -> Path:
    """The schedule file `diffes-pl test` evaluates: `schedule`, else <root_dir>/schedule.json."""
    return Path(schedule) if schedule else Path(root_dir) / "schedule.json"


def check_schedule_file(path: Path, store_path: Path, identity: dict | None) -> tuple[Schedule, TrajectoryStore]:
    """The schedule at `path` and the store it is evaluated on, refused — from the schedule file and
    the store's manifest alone, before any denoiser loads or image is sampled — when that store cannot
    route it (`routing.check_routable`; `identity`: the denoiser's, None to skip that check)."""
    schedule = Schedule.load(path)
    store = schedule_store(store_path, schedule, path)
    check_routable(schedule, store, identity)
    return schedule, store


def schedule_store(configured: Path, schedule: Schedule, source: Path) -> TrajectoryStore:
    """The store a schedule file is evaluated on: the one recorded in it (where it was searched),
    else the run's configured store (`configured`), if it is that same store (same key), never another one."""
    if schedule.store and TrajectoryStore.exists(schedule.store):
        store = TrajectoryStore.open(schedule.store)
    else:
        store = TrajectoryStore.open(configured)
        if schedule.store_key is not None and schedule.store_key != store.key:
            raise StoreMismatchError(
                f"the schedule {source} was searched on the trajectory store {schedule.store} (key "
                f"{schedule.store_key[:12]}…), which is gone; the configured store {configured} (key {store.key[:12]}…, "
                f"pruner {store.pruner}) is another one; point `--model.store` at the schedule's store, or rebuild it "
                f"with the settings of the search")
    check_store(schedule, store)
    return store
