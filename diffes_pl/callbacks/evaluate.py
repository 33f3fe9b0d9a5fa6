"""FID / IS / precision-recall / SSIM / MACs / latency of the best schedule when fit ends: the same
evaluation as `diffes-pl test` (diffes_pl.evaluation.report), written to <default_root_dir>/evaluation.json."""
from __future__ import annotations

import lightning as L


class EvaluateAtFitEnd(L.Callback):
    """Evaluates the search's best schedule (and uniform + dense) at the end of fit.

    Sampling is split across the fit's ranks; metrics, the table and evaluation.json come from rank 0.
    Images are kept under <default_root_dir>/eval/, so a later `diffes-pl test` with the same
    settings reuses them."""

    def __init__(self, num_images: int = 500, batch_size: int = 100, metrics: list[str] | None = None,
                 seed: int = 2024, latency_batch_size: int = 16, latency_repeats: int = 3, uniform: bool = True,
                 reference: str | None = None, feature_network: str | None = None) -> None:
        """
        Args:
            num_images: images per schedule. batch_size: images per sampling batch.
            metrics: fid, is, precision_recall, ssim, class_accuracy, clip (default: all but clip).
            seed: seed of the evaluation noise. latency_batch_size: 0 skips latency.
            latency_repeats: timed runs (median). uniform: also evaluate the uniform schedule.
            reference / feature_network: see `diffes_pl.evaluation.report.EvalConfig`.
        """
        from diffes_pl.evaluation.report import EvalConfig

        kw = dict(num_images=num_images, batch_size=batch_size, seed=seed, latency_batch_size=latency_batch_size,
                  latency_repeats=latency_repeats, uniform=uniform, reference=reference,
                  feature_network=feature_network)
        self.config = EvalConfig(**kw, **({"metrics": list(metrics)} if metrics is not None else {}))
        self.result: dict | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.search is None or not pl_module.search.survivors:
            return  # nothing searched (e.g. fit stopped before the first generation)
        from diffes_pl.evaluation.report import evaluate_schedule

        log = print if trainer.global_rank == 0 else (lambda *_: None)
        context = pl_module.context
        self.result = evaluate_schedule(context, trainer, pl_module.best_schedule(), self.config,
                                        context.root_dir, log=log, launched=True,
                                        source="best schedule at fit end")
