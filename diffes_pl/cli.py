"""The `diffes-pl` command: a LightningCLI with three subcommands.

    diffes-pl fit --config configs/tiny_obs.yaml       calibrate (if no matching store) + search
    diffes-pl predict --config configs/tiny_obs.yaml   calibrate + build the trajectory store
    diffes-pl test --config configs/tiny_obs.yaml [--schedule runs/tiny_obs/schedule.json]
                                                       evaluate a schedule (FID, IS, P/R, MACs, latency)

`model:` in a config is the DiffES LightningModule (the denoiser is `model.denoiser`), `data:` the
calibration datamodule, `trainer:` Lightning's Trainer.
"""
from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data.calibration import CalibrationDataModule
from .search.module import DiffES


class DiffESCLI(LightningCLI):
    """LightningCLI for Diff-ES runs."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            DiffES, CalibrationDataModule,
            # resuming a run rewrites its config.yaml instead of refusing to start
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
            parser_kwargs={"description": "Diff-ES: stage-wise structural pruning of diffusion models by "
                                          "evolutionary search (PyTorch Lightning)."},
            args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "predict": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # LightningCLI gives a subcommand the arguments of the Trainer method of that name only;
        # `test` also takes the schedule and the evaluation settings, passed on to `self.test`.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            from .search.report import EvalConfig

            parser.add_argument("--schedule", type=str | None, default=None,
                                help="schedule JSON to evaluate (default: <default_root_dir>/schedule.json); "
                                     "its folder receives eval/ and evaluation.json")
            parser.add_class_arguments(EvalConfig, "eval", help="what the evaluation measures")
            self._subcommand_method_arguments[subcommand] += ["schedule", "eval"]
        return parser

    def before_fit(self) -> None:
        # Calibration (when no matching store exists) runs as the pruner's predict epochs on the
        # same trainer (same devices and strategy); the search itself needs no datamodule.
        self.model.ensure_store(self.trainer, self.datamodule, log=self._log)
        self.datamodule = None

    def predict(self, model: DiffES, datamodule: CalibrationDataModule | None = None, **_: Any) -> None:
        model.ensure_store(self.trainer, datamodule, log=self._log)

    def test(self, model: DiffES, datamodule: CalibrationDataModule | None = None, schedule: str | None = None,
             eval: Any = None, **_: Any) -> None:
        from lightning.pytorch.cli import SaveConfigCallback

        from .search.report import evaluate_run

        # sampling runs under trainer.predict, whose setup would overwrite the fit's config.yaml
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.already_saved = True
        evaluate_run(model, self.trainer, schedule=schedule, config=eval, log=self._log)

    def _log(self, message: str) -> None:
        if self.trainer.global_rank == 0:
            print(message, flush=True)


# Errors a user can fix: one line, exit code 2, no traceback wall.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .denoisers import UnknownDenoiserError
    from .partition import ScheduleError
    from .trajectory import StoreMismatchError

    return (UnknownDenoiserError, ScheduleError, StoreMismatchError, ValueError, FileNotFoundError, OSError,
            ImportError)


def main(args: Any = None) -> None:
    try:
        DiffESCLI(args=args)
    except _user_errors() as err:
        cause = err
        while cause.__cause__ is not None and str(err) == "":
            cause = cause.__cause__
        print(f"diffes-pl: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
