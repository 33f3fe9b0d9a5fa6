"""Plots of a search: fitness per generation, and the best schedule as sparsity per stage (like the
paper's Figure 4). Written to <default_root_dir>/plots/ at the end of fit."""
from __future__ import annotations

from pathlib import Path

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
        if trainer.global_rank != 0 or not getattr(pl_module, "archive", None):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        archive = pl_module.archive
        sign = 1 if pl_module.metric.higher_is_better else -1
        gens = sorted({r["generation"] for r in archive})
        best, running = [], None
        for g in gens:
            vals = [r["fitness"] for r in archive if r["generation"] == g]
            top = max(vals, key=lambda v: sign * v)
            running = top if running is None or sign * top > sign * running else running
            best.append(running)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(gens, best, marker=".")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"best {pl_module.hparams.metric}")
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
