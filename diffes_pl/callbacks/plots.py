"""Plots of a search: fitness per generation, and the best schedule as sparsity per stage (like the
paper's Figure 4). Written to <default_root_dir>/plots/ at the end of fit.

They read the search module's public parts only: its run context (`context`: folder, denoiser, store,
sampling settings, metric), its search (`search.archive`) and `best_schedule()`."""
from __future__ import annotations

import lightning as L


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
        plt.close(fig)


class SampleGrid(L.Callback):
    """Saves `samples.png` at the end of fit: dense (top row) vs the best schedule (bottom row) on
    the same seeds and labels (or, for text-to-image models, the run's probe prompts in turn)."""

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
        import torch
        from torchvision.utils import save_image

        import diffes_pl as dp
        from diffes_pl.caching.installed import install_schedule

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
        grid = torch.cat([dense, pruned]).float()
        if grid.shape[-1] < 64:  # upscale tiny images so the grid is readable
            grid = torch.nn.functional.interpolate(grid, scale_factor=64 // grid.shape[-1], mode="nearest")
        save_image(grid, out / "samples.png", nrow=self.num, padding=2, pad_value=1.0)
