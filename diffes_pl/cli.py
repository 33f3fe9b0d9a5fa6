"""The `diffes-pl` command: a LightningCLI with three subcommands.

    diffes-pl fit --config configs/tiny_obs.yaml       calibrate (if no matching store) + search
    diffes-pl predict --config configs/tiny_obs.yaml   calibrate + build the trajectory store
    diffes-pl test --config configs/tiny_obs.yaml [--schedule runs/tiny_obs/schedule.json]
                                                       evaluate a schedule (FID, IS, P/R, MACs, latency)

`model:` in a config is the DiffES LightningModule (the denoiser is `model.denoiser`), `data:` the
calibration datamodule, `trainer:` Lightning's Trainer.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .cli_help import DESCRIPTION, SUBCOMMAND_HELP
from .cli_parser import TRAINER_GROUP_HELP, TRAINER_HELP_SHOWN, DiffESParser
from .data.calibration import CalibrationDataModule
from .io import check_writable
from .search.lightning_module import DiffES
from .search.resume import GenerationCheckpoint
from .trajectory import TrajectoryStore, make_key


class Terminated(RuntimeError):
    """The run was stopped by SIGTERM or Ctrl-C after saving what can be resumed; `code` is the exit
    code (128 + the signal)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class RunFolderConfig(SaveConfigCallback):
    """Writes config.yaml into the run folder (--trainer.default_root_dir) whatever logger is
    configured: LightningCLI writes it into `trainer.log_dir`, a logger's version folder when one is
    configured, away from the schedule, checkpoint and store it describes."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:  # rank 0 only
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # None values are kept (the file reproduces the run); jsonargparse 4.49 renamed the option (the old name warns)
        from importlib.metadata import version

        keep = "skip_unset" if tuple(int(x) for x in version("jsonargparse").split(".")[:2]) >= (4, 49) else "skip_none"
        self.parser.save(self.config, str(folder / self.config_filename), overwrite=self.overwrite,
                         multifile=self.multifile, **{keep: False})


class DiffESCLI(LightningCLI):
    """LightningCLI for Diff-ES runs."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            DiffES, CalibrationDataModule,
            # resuming a run rewrites its config.yaml instead of refusing to start
            save_config_callback=RunFolderConfig, save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            # the search's own checkpoint is in place before Lightning adds a default ModelCheckpoint
            trainer_defaults={"logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                              "callbacks": [GenerationCheckpoint()]},
            parser_kwargs={"description": DESCRIPTION},
            parser_class=DiffESParser,
            # the search has no optimizer: no --optimizer / --lr_scheduler options
            auto_configure_optimizers=False,
            args=args, run=run, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # LightningCLI takes a subcommand's help from the Trainer method's docstring ("Run inference
        # on your data"); say what the subcommand does in diffes-pl instead.
        kwargs = {name: {"description": text, **kwargs.get(name, {})} for name, text in SUBCOMMAND_HELP.items()}
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:  # the list in `diffes-pl --help`
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)
        for name, subparser in self._subcommand_parsers.items():
            subparser.hide_from_help("trainer", TRAINER_HELP_SHOWN, TRAINER_GROUP_HELP)  # a search trains nothing
            for group in subparser._action_groups:  # the Trainer method's docstring titles its options
                if group.title and group.title.startswith(("Runs the full", "Run inference", "Perform one")):
                    group.title = f"{name} options"
            for action in subparser._actions:
                if name == "fit" and action.dest == "ckpt_path":
                    action.help = ("resume an interrupted search: `last` (the run folder's checkpoints/last.ckpt, "
                                   "whatever logger is configured) or a checkpoint file")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._check_folders(self.config.get("subcommand"))  # before seeding or building anything

    def _check_folders(self, subcommand: str | None) -> None:
        if subcommand is None:
            return
        config = self.config[subcommand]
        run_dir = Path(config.trainer.default_root_dir or os.getcwd())
        if subcommand == "test":  # evaluation writes next to the schedule (a missing one is refused on load)
            schedule = config.get("schedule")
            folder = Path(schedule).parent if schedule else run_dir
            if folder.is_dir():
                check_writable(folder, "evaluation folder", "--schedule" if schedule else "--trainer.default_root_dir")
            return
        check_writable(run_dir, "run folder", "--trainer.default_root_dir")
        store = Path(config.model.store or run_dir / "store")
        if not TrajectoryStore.exists(store):  # a built store is only read (a mismatch is refused, not rebuilt)
            check_writable(store, "store folder",
                           "--model.store" if config.model.store else "--trainer.default_root_dir or --model.store")

    def _dry_run_requested(self) -> bool:
        return self.subcommand in ("fit", "predict") and bool(self.config[self.subcommand].get("dry_run"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        if self._dry_run_requested():  # the plan needs no Trainer (nor the GPU a config may name)
            return None
        # Lightning refuses enable_progress_bar=False while a ProgressBar is among the callbacks, and
        # the shipped configs list SearchProgress: switching the display off drops it.
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("enable_progress_bar") is False and "callbacks" not in kwargs:
            callbacks = trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ProgressBar)]
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        if self._dry_run_requested():
            self._dry_run()
            self.subcommand = None  # LightningCLI then runs no subcommand: nothing loaded, nothing written

    def _dry_run(self) -> None:
        """`--dry_run true`: the memory plan on the configured accelerator, whether it fits here (where
        that device can be asked), and nothing else."""
        import torch

        from .memory import InsufficientMemoryError

        config = self.config[self.subcommand]
        run_dir = Path(config.trainer.default_root_dir or os.getcwd())
        device = _configured_device(config.trainer.accelerator)
        plan = self.model.memory_plan(run_dir, self.datamodule, device, weights=False)
        if plan is None:
            raise ValueError(f"no config of {self.model.settings.denoiser} is at hand without loading it: download it "
                             "(hf download) or pass a local folder, then plan again")
        print(plan.format(), flush=True)
        where = "host" if device.type == "cpu" else "accelerator and host"
        if device.type == "cuda" and not torch.cuda.is_available():
            print("  accelerator not checked against free memory: no CUDA device on this machine", flush=True)
            device, where = torch.device("meta"), "host"  # the host is still checked
        try:
            plan.check(_phases(self.subcommand, plan), device=device)
            print(f"  {where}: fits in the memory free here", flush=True)
        except InsufficientMemoryError as err:
            print(f"  would be refused: {err}", flush=True)

    def _check_memory(self, subcommand: str) -> None:
        """Before the denoiser loads: the plan printed (rank 0) when a store must be built, and the run
        refused (InsufficientMemoryError, naming the biggest term and its fix) when a phase it runs will
        not fit on the accelerator or the host."""
        root = self.trainer.default_root_dir
        plan = self.model.memory_plan(root, self.datamodule, self.trainer.strategy.root_device)
        calibrating = plan is not None and any(p.startswith("calibration") for p in plan.phases)
        if plan is None or (subcommand == "predict" and not calibrating):
            return  # no config before loading, or a store to reuse: predict has nothing to plan
        if calibrating:
            self._log(plan.format())
        plan.check(_phases(subcommand, plan))

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            # calibration and evaluation start from no checkpoint and return nothing: hide those options
            "predict": {"model", "dataloaders", "datamodule", "return_predictions", "ckpt_path", "weights_only"},
            "test": {"model", "dataloaders", "datamodule", "verbose", "ckpt_path", "weights_only"},
        }

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # LightningCLI gives a subcommand the arguments of the Trainer method of that name only;
        # `test` also takes the schedule and the evaluation settings, passed on to `self.test`.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            from .evaluation.report import EvalConfig

            parser.add_argument("--schedule", type=str | None, default=None,
                                help="schedule JSON to evaluate (default: <default_root_dir>/schedule.json); "
                                     "its folder receives eval/ and evaluation.json")
            parser.add_class_arguments(EvalConfig, "eval", help="what the evaluation measures")
            self._subcommand_method_arguments[subcommand] += ["schedule", "eval"]
        if subcommand in ("fit", "predict"):
            # an option of the invocation, not of the run: kept out of DiffES's hparams (the checkpoint,
            # the resume check) and acted on before the Trainer exists (a GPU config's Trainer cannot
            # even be made on a machine without one); not passed to the subcommand's method
            parser.add_argument("--dry_run", type=bool, default=False,
                                help="print the run's memory plan (accelerator and host, per phase) from the "
                                     "denoiser's architecture on the meta device and exit: no weights, no "
                                     "download, no run folder")
        if subcommand == "fit":
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="start a new search in a run folder that holds one (its schedule.json, "
                                     "evaluations.jsonl, checkpoints and plots are removed first; the store is kept)")
            self._subcommand_method_arguments[subcommand] += ["overwrite"]
        return parser

    def before_fit(self) -> None:
        # Everything that can refuse runs before the denoiser loads and before anything is written or
        # removed: the settings on this denoiser (from its config), the run folder's lock, what the
        # folder already holds, the checkpoint a resume starts from (resolved here: Lightning resolves
        # "last" before the search's own checkpoint callback exists, and in a logger's folder), and a
        # store in the way. Only then does `--overwrite true` clear the folder.
        from .locks import exclusive
        from .search.resume import (
            check_resumable,
            checkpoint_file,
            clear_outputs,
            read_checkpoint,
            resolve_resume,
        )

        config = self.config_init[self.subcommand]
        run_dir = Path(self.trainer.default_root_dir)
        self.model.check_run(run_dir)
        self._check_memory("fit")
        if self.trainer.global_rank == 0:
            self._lock(exclusive, run_dir, f"running a search in {run_dir}",
                       "wait for it to stop, or choose another --trainer.default_root_dir")
            ckpt_path = resolve_resume(run_dir, config["ckpt_path"], config["overwrite"])
        else:  # launched by rank 0 inside its lock, after it checked (and maybe cleared) the folder
            ckpt_path = checkpoint_file(run_dir, config["ckpt_path"])
        config["ckpt_path"] = ckpt_path
        self.restored = 0
        resume_line = None
        if ckpt_path is not None:
            checkpoint = read_checkpoint(ckpt_path)
            key = make_key(self.model.store_key_fields(self.datamodule)) if self.datamodule is not None else None
            resume_line = check_resumable(checkpoint, ckpt_path, dict(self.model.hparams), key, self.trainer.max_epochs)
            self.restored = len(checkpoint["diffes"]["archive"])
        if self.datamodule is not None:
            self.model.check_run(run_dir, self.datamodule)  # a store in the way built for other settings
        if self.trainer.global_rank == 0 and config["overwrite"]:
            clear_outputs(run_dir)
        if resume_line is not None:
            self._log(resume_line)
        # Calibration (when no matching store exists) runs as the pruner's predict epochs on the
        # same trainer (same devices and strategy); the search itself needs no datamodule.
        self.model.ensure_store(self.trainer, self.datamodule, log=self._log)
        self.datamodule = None

    def before_predict(self) -> None:
        self.model.check_run(self.trainer.default_root_dir, self.datamodule)  # before the denoiser loads
        self._check_memory("predict")

    def before_test(self) -> None:
        # the schedule against the run's denoiser, partition and store, from the schedule file and the
        # store's manifest: a schedule the store cannot route is refused before the denoiser loads
        from .evaluation.report import check_schedule_file, schedule_path

        config = self.config_init["test"]
        run_dir = Path(self.trainer.default_root_dir)
        plan = self.model.check_run(run_dir)
        check_schedule_file(schedule_path(run_dir, config.get("schedule")), self.model.store_folder(run_dir),
                            None if plan is None else plan.adapter.identity())

    def _lock(self, exclusive, folder: Path, what: str, fix: str) -> None:
        """Holds the lock on `folder` until the subcommand ends; a folder the lock created is removed
        again if the subcommand fails and leaves it empty (a refused run leaves nothing behind)."""
        if not folder.exists():  # pushed first: runs after the lock is released (and its file removed)
            self._held.push(lambda kind, *_: _remove_if_empty(folder) if kind is not None else None)
        self._held.enter_context(exclusive(folder / ".diffes-pl.lock", what, fix))

    def fit(self, model: DiffES, overwrite: bool = False, **kwargs: Any) -> None:
        self.trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        search = self.model.search
        if search is None or not search.survivors:
            self._log("search: nothing evaluated")
            return
        cost, reason = search.cost(), self.model.stop_reason()
        raced = sum(bool(r.get("raced_out")) for r in search.archive)
        self._log(f"search: {search.generation} generations, {len(search.archive)} schedules evaluated "
                  f"({self.restored} restored from the checkpoint, {self.model.evaluated_this_run} evaluated by this run"
                  f"{f'; {raced} raced out on the probe subset' if search.racing is not None else ''}); "
                  f"cost {cost['probe_steps']:,} probe-steps, {cost['macs'] / 1e12:.3g} TMAC; "
                  f"best {search.metric.name} {search.best_fitness:.4f} → {self.model.context.root_dir / 'schedule.json'}"
                  + (f"; stopped early, {reason}" if reason else ""))

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from .interrupts import stop_on_signals

        # Ctrl-C stops as SIGTERM does (at the next boundary: between two rollouts, two calibration
        # stages), for the length of the subcommand only
        with stop_on_signals(lambda: getattr(self, "trainer", None)) as interrupt:
            try:
                with ExitStack() as self._held:  # locks taken by before_<subcommand>, released at its end
                    super()._run_subcommand(subcommand)
            except SIGTERMException as stop:
                # every rank stops; rank 0 alone says so (one line)
                message = self._stopped_message(interrupt.signal, stop) if self.trainer.global_rank == 0 else ""
                raise Terminated(message, interrupt.exit_code) from None

    def _stopped_message(self, signum: signal.Signals = signal.SIGTERM, stop: BaseException | None = None) -> str:
        """The one line saying which signal stopped the run, where its checkpoint is and how to resume
        (or that nothing is resumable); a stopped calibration says which stages it kept."""
        from .pruners.store_build import CalibrationStopped
        from .search.resume import CHECKPOINT

        name = signal.Signals(signum).name
        if isinstance(stop, CalibrationStopped):
            return f"stopped by {name} during `{self.subcommand}`; {stop.resume_line()}"
        path = Path(self.trainer.default_root_dir) / CHECKPOINT
        if self.subcommand != "fit" or not path.is_file():
            return f"stopped by {name} during `{self.subcommand}`; nothing to resume: run the command again"
        if self.model.search is None:  # stopped before the search resumed from an earlier run's checkpoint
            return f"stopped by {name} before the search resumed; {path} holds it: resume with --ckpt_path last"
        return (f"stopped by {name} after generation {self.model.search.generation}; {path} holds it: "
                "resume with --ckpt_path last")

    def predict(self, model: DiffES, datamodule: CalibrationDataModule | None = None, **_: Any) -> None:
        model.ensure_store(self.trainer, datamodule, log=self._log)

    def test(self, model: DiffES, datamodule: CalibrationDataModule | None = None, schedule: str | None = None,
             eval: Any = None, **_: Any) -> None:
        from lightning.pytorch.cli import SaveConfigCallback

        from .evaluation.report import evaluate_run

        # sampling runs under trainer.predict, whose setup would overwrite the fit's config.yaml
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.already_saved = True
        context = model.prepare(self.trainer.default_root_dir, self.trainer.strategy.root_device)
        evaluate_run(context, self.trainer, schedule=schedule, config=eval, log=self._log)

    def _log(self, message: str) -> None:
        if self.trainer.global_rank == 0:
            print(message, flush=True)


def _configured_device(accelerator: Any) -> Any:
    """The device a config's `trainer.accelerator` names, without making the Trainer."""
    import torch

    name = str(getattr(accelerator, "class_path", accelerator) or "auto").lower()
    if name in ("gpu", "cuda") or "cuda" in name or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if name in ("cpu", "auto") or "cpu" in name:
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:  # an accelerator torch has no device name for: planned, not checked
        return torch.device("meta")


def _phases(subcommand: str, plan: Any) -> list[str]:
    """The plan's phases a subcommand runs: predict loads and calibrates; fit also searches."""
    return [p for p in plan.phases if p != "sampling" and (subcommand == "fit" or p != "search")]


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone): what it holds is kept
        pass


# Errors a user can fix: one line, exit code 2, no traceback wall.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .denoisers import UnknownDenoiserError
    from .locks import LockedError
    from .memory import InsufficientMemoryError
    from .errors import ScheduleError
    from .integrity import DamagedFileError
    from .search.resume import ResumeError
    from .trajectory import StoreMismatchError

    return (LockedError, ResumeError, InsufficientMemoryError, UnknownDenoiserError, ScheduleError,
            StoreMismatchError, DamagedFileError, ValueError, FileNotFoundError, OSError, ImportError)


def main(args: Any = None) -> None:
    try:
        DiffESCLI(args=args)
    except Terminated as err:
        if str(err):
            print(f"diffes-pl: {err}", file=sys.stderr)
        sys.exit(err.code)  # 128 + the signal (143 SIGTERM, 130 Ctrl-C): the job did not finish
    except _user_errors() as err:
        cause = err
        while cause.__cause__ is not None and str(err) == "":
            cause = cause.__cause__
        print(f"diffes-pl: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
