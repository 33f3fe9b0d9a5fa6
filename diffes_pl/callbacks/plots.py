"""Plots of a search: fitness per generation, and the best schedule as sparsity per stage (like the
paper's Figure 4). Written to <default_root_dir>/plots/ at the end of fit, and to the trainer's loggers
(TensorBoard: the images, under plots/<name>; other loggers: the file paths, as hyperparameters).

They read the search module's public parts only: its run context (`context`: folder, denoiser, store,
sampling settings, metric), its search (`search.archive`) and `best_schedule()`."""
from __future__ import annotations

import lightning as L

from diffes_pl.evaluation.to_loggers import log_figure, log_image


class SearchPlots(L.Callback):
    """Saves `fitness.png` and `schedule.png` when fit ends (rank 0)."""

    def __init__(self, dirname: str = "plots") -> None:
        """
        Args:
            dirname: folder under the trainer's default_root_dir.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        search, context = pl_module.search, pl_module.context
        if trainer.global_rank != 0 or search is None or not search.archive:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = context.root_dir / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        archive = search.archive
        sign = 1 if context.metric.higher_is_better else -1
        gens = sorted({r["generation"] for r in archive})
        best, running = [], None
        for g in gens:
            # raced-out children were scored on a probe subset only: not comparable with the best
            vals = [r["fitness"] for r in archive if r["generation"] == g and not r.get("raced_out")]
            if not vals:
                best.append(running)
                continue
            top = max(vals, key=lambda v: sign * v)
            running = top if running is None or sign * top > sign * running else running
            best.append(running)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(gens, best, marker=".")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"best {context.metric.name}")
        fig.tight_layout()
        fig.savefig(out / "fitness.png", dpi=120)
        log_figure(trainer, "plots/fitness", fig, out / "fitness.png")
        plt.close(fig)

        schedule = pl_module.best_schedule()
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(range(schedule.num_stages), [100 * l / schedule.levels_max for l in schedule.levels])
        ax.axhline(100 * schedule.sparsity, color="k", ls="--", lw=1, label="budget")
        ax.set_xlabel("stage (0 = first sampling steps)")
        ax.set_ylabel("sparsity %")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "schedule.png", dpi=120)
        log_figure(trainer, "plots/schedule", fig, out / "schedule.png")
        plt.close(fig)


class SampleGrid(L.Callback):
    """Saves `samples.png` at the end of fit: dense (top row) vs the best schedule (bottom row) on
    the same seeds and labels (or, for text-to-image models, the run's probe prompts in turn), each
    row labelled on its left, small images enlarged (`evaluation/grids.py`)."""

    def __init__(self, num: int = 10, seed: int = 0, dirname: str = "plots") -> None:
        """
        Args:
            num: samples per row. seed: seed of their noise. dirname: folder under default_root_dir.
        """
        self.num, self.seed, self.dirname = num, seed, dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        search, context = pl_module.search, pl_module.context
        if trainer.global_rank != 0 or search is None or not search.survivors:
            return
        import numpy as np
        import torch

        import diffes_pl as dp
        from diffes_pl.caching.installed import install_schedule
        from diffes_pl.evaluation.grids import labelled_rows

        adapter, prompts = context.adapter, context.prompts
        if prompts:
            conditions = [prompts[i % len(prompts)] for i in range(self.num)]
        else:
            conditions = torch.arange(self.num) % (adapter.num_classes or self.num)  # None: text-conditioned
        kw = dict(steps=context.steps, guidance=context.guidance, seed=self.seed, sampler=context.sampler)
        dense = dp.sample(adapter, conditions, **kw)
        schedule = pl_module.best_schedule()
        with install_schedule(adapter, context.store, schedule) as installed:  # router (+ feature cache)
            pruned = dp.sample(adapter, conditions, router=installed.router, cache=installed.cache, **kw)
        out = context.root_dir / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        image = labelled_rows([("dense", dense.float().cpu()), (row_label(schedule), pruned.float().cpu())])
        image.save(out / "samples.png")
        log_image(trainer, "plots/samples", torch.from_numpy(np.array(image)).permute(2, 0, 1), out / "samples.png")


def row_label(schedule) -> str:
    """samples.png's label of the searched row: its levels (and cache intervals) and sparsity."""
    label = "searched: levels " + " ".join(map(str, schedule.levels))
    if schedule.caches:
        label += " / k " + " ".join(map(str, schedule.intervals))
    return f"{label} ({schedule.sparsity:.0%} sparse)"
