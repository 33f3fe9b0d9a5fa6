"""DiffES: the LightningModule of a Diff-ES run — a thin shell around the search.

`predict` calibrates and builds the trajectory store (the pruner's predict epochs, one per stage).
`fit` runs the evolutionary search (`evolution.EvolutionarySearch`, a plain object) ONE GENERATION
PER EPOCH (`max_epochs` = generations). This module holds Lightning glue only: its arguments are
checked by `settings.SearchSettings` when it is made; it prepares the run context (`context`: run
folder, store, denoiser, partition — what callbacks and evaluation read), has the search assembled
in `setup` (`builder.build_search`), runs one `search.step` per training step with an evaluator that splits the new
schedules across ranks and sums their fitness values, logs the generation's statistics, writes
schedule.json and evaluations.jsonl, and puts `search.state_dict()` into the checkpoint
`GenerationCheckpoint` (search/resume.py) saves as `<run>/checkpoints/last.ckpt` after every
generation — so a run killed at any point and resumed with `--ckpt_path last` ends exactly as an
uninterrupted one. A SIGTERM (a cluster's preemption) or Ctrl-C (`interrupts.py`) stops the search
at once: the generation under way is dropped, the last checkpoint stands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..denoisers.tiny import NAME as BUILTIN
from ..io import atomic_path
from ..pruners.base import CALIBRATE_BY, Pruner, store_key_fields
from ..pruners.store_build import build_store
from ..pruners.obs import OBSPruner
from ..run import RunContext
from ..schedule import Schedule
from ..trajectory import TrajectoryStore
from .archive_file import evaluation_lines
from .builder import RunPlan, build_context, build_search, check_existing_store, plan_run, rebind_context, store_path
from .evolution import EvolutionarySearch
from .progress_line import GenerationTimer, generation_line, wants_plain_lines
from .resume import GenerationCheckpoint
from .settings import DEFAULT_TARGET_LEVEL, SearchSettings
from .space import SearchSpace


class DiffES(L.LightningModule):
    """Stage-wise structural pruning by evolutionary search (one generation per epoch)."""

    stops_at_boundaries = True  # a stop request (trainer.received_sigterm) ends the search between rollouts

    def __init__(
        self,
        denoiser: str = BUILTIN,
        pruner: Pruner | None = None,
        target_level: float | None = None,
        sparsity: float | None = None,
        levels: int | None = None,
        num_stages: int = 10,
        steps: int = 20,
        sampler: str = "ddim",
        guidance: float = 2.0,
        store: str | None = None,
        offspring: int = 16,
        survivors: int = 4,
        max_move: int = 5,
        moves_per_child: int = 1,
        init: str = "hybrid",
        seeds: list[list[int] | list[list[int]]] | None = None,
        metric: str = "ssim",
        num_probes: int = 64,
        probe_seed: int = 1234,
        probe_batch_size: int | None = None,
        search_seed: int = 0,
        dtype: str = "float32",
        resident_routing: bool = True,
        calibrate_by: str = "auto",
        stream_weights: bool | None = None,
        prompts: list[str] | None = None,
        cache_intervals: list[int] | None = None,
        cache_branch: int | None = None,
        mac_budget: float | None = None,
        interval_rate: float | None = None,
        race_probes: int | list[int] | None = None,
        race_confidence: float = 2.0,
        stop_patience: int | None = None,
        stop_delta: float = 0.0,
        batch_candidates: bool = False,
        proposal: str = "evolution",
    ) -> None:
        """
        Args:
            denoiser: `tiny-digits`, a hub id (`facebook/DiT-XL-2-256`) or a local folder.
            pruner: how units are ranked per stage (obs, wanda, magnitude, activation, depth).
            target_level: the budget: the step-weighted mean level of every schedule (default 4 when
                sparsity is not given either).
            sparsity: the budget as a fraction in [0, 1] of the prunable units (heads and MLP channels,
                or blocks for depth pruning) removed, averaged over the steps: target_level / H (0.5 with
                H = 8 is target_level 4). Give it or target_level; both given must agree.
            levels: H, the number of levels (default: head count of the narrowest attention, or
                the block count for depth pruning). Level L removes round(L/H · n) units per group.
            num_stages: S, contiguous groups of sampling steps (stage 0 = first steps).
            steps: sampling steps.
            sampler: the sampling scheduler, one the denoiser's family offers: `ddim`, `dpm` or `euler_a`
                (DiT, tiny), `dpm` or `ddim` (PixArt), `euler_a` or `ddim` (SDXL), `flow_euler` (FLUX, SD3).
            guidance: classifier-free guidance scale (1: no guidance).
            store: trajectory store folder (default: <default_root_dir>/store); one store can serve
                many searches.
            offspring: children per generation.
            survivors: individuals kept from one generation to the next (elitist).
            max_move: largest level-switch move.
            moves_per_child: moves applied per child.
            init: initial population: hybrid (uniform + patterned + random), uniform, random, patterned.
            seeds: user schedules put into the initial population (a joint search: [levels, intervals]
                pairs, or plain levels meaning cache interval 1 in every stage).
            metric: fitness: ssim, psnr, latent_mse, class_accuracy, class_confidence, ssim_confidence,
                digits_fid, digits_kid, ssim_minus_kid, topiq, clipiqa, or `package.module:function`.
            num_probes: probes (seeded noise + labels) the fitness is measured on.
            probe_seed: seed of the probes.
            probe_batch_size: probes per denoiser call (default: all probes at once, or, with
                batch_candidates, chosen from free GPU memory); lower it when the search runs out of memory.
            search_seed: seed of the search's own generator (population, mutation).
            dtype: inference dtype of the denoiser (float32, float16, bfloat16).
            resident_routing: keep every stage's sliced weights of a candidate resident (fastest);
                false shares one buffer per layer, refilled at stage boundaries (the search's peak
                memory drops to about one pruned copy on top of the dense model; same fitness).
            calibrate_by: how a stage is calibrated: `model` (every block's statistics at once) or
                `block` (one block's statistics at a time: peak statistics memory follows the largest
                block; the inputs embedded once and each block's outputs carried to the next, on a
                UNet the forward re-run up to each block), or `auto` (block by block when the
                weights and the whole model's statistics do not fit in free memory). The same store
                either way, bit for bit; block by block, a stopped or killed calibration resumes at
                the block it reached.
            stream_weights: calibrate with the blocks' weights on the host, each moved to the
                accelerator for its own turn (block by block on a stack of blocks: every family but
                SDXL), so a model calibrates on an accelerator smaller than its weights; default:
                when the weights and one block's statistics do not fit. The same store either way.
            prompts: probe prompts of text-conditioned denoisers (required there, refused
                elsewhere): probe i is prompts[i % len(prompts)] with its own seeded latent, encoded
                once by the denoiser's text encoders; CFG's unconditional half is the adapter's null
                condition.
            cache_intervals: the cache intervals k the search may give each stage (e.g. [1, 2, 3]; 1: no
                caching, k > 1: the deep part is recomputed every k-th step of the stage and reused
                between; every stage starts with a full step). Set, the search is JOINT: a level AND a
                cache interval per stage under a MAC budget (`mac_budget`); schedule.json then holds
                cache_intervals, cache_branch, mac_budget and the step-cost table, and `diffes-pl test`
                / `dp.sample(..., cache=caching.schedule_cache(adapter, schedule))` sample it routed and
                cached. None (default): the level-only search.
            cache_branch: where the cached deep part starts (block caching: the first cached block b,
                in [0, N); DeepCache: the UNet skip branch). Default: the middle block (N // 2) for
                block caching, branch 0 for DeepCache. Only with cache_intervals.
            mac_budget: the joint search's budget, a fraction in (0, 1] of the dense trajectory's MACs.
                Default: what the level-only uniform schedule at target_level costs, so level-only
                schedules meeting today's level budget meet it too. Only with cache_intervals.
            interval_rate: the joint search's share of mutation moves that change a stage's cache
                interval (the rest move a level), a probability in [0, 1]. None (default): every
                single-stage move equally likely — each other interval and each level step ±1..max_move
                of the drawn stage (with 2-step stages and max_move 3, about one move in seven changes
                an interval); 0.5 is what joint searches did before this setting. Only with
                cache_intervals; fixed for the search (a resume must keep it: it changes the mutations).
            race_probes: racing: score every child on the first `race_probes` probes first and finish
                (on all probes) only those whose upper confidence bound can still reach the worst
                survivor (`search/racing.py`); about num_probes / 4 saves most. A list of increasing
                subset sizes races in rungs (successive halving style, e.g. [8, 16]: the first 8 probes,
                then the children still in the race on 16, then all). Survivors are always
                compared on all probes. None (default): every child on all probes. Needs a metric
                with per-probe values (ssim, psnr, latent_mse, class_accuracy, topiq, clipiqa).
            race_confidence: z of racing's bound (larger: fewer children stopped early, safer).
            stop_patience: stop the search after this many generations in which the best fitness did
                not improve by more than `stop_delta` (Lightning's EarlyStopping on `best_fitness`; the
                checkpoint and schedule.json record why it stopped). None (default): run every
                generation, so results stay comparable. With racing, keep it long (40 on the
                demo): racing can stall the climb for 30 generations, and patience 10 stopped one
                search in three on a worse schedule (benchmarks/RESULTS.md, "Search cost in parts").
            stop_delta: the improvement of the best fitness that counts (with stop_patience).
            batch_candidates: evaluate a generation's children together, stage by stage: children
                continuing with the same level (and cache interval) in a stage share its denoiser calls
                (their latents concatenated, `probe_batch_size` rows per call — chosen from free GPU
                memory when not given), shared prefixes run once. For GPUs; fitness equals one by one
                up to float rounding. Multistep samplers (dpm) run one by one.
            proposal: how each generation's new schedules are made: `evolution` (Diff-ES: mutants of the
                survivors), or a baseline searched by the same loop, with the same probes, fitness,
                racing and cost meter, so that its evaluations compare one for one: `random` (fresh
                random budget-meeting schedules every generation: random search) or `greedy` (the
                best schedule's whole one-move neighbourhood each generation, from the uniform
                schedule: best-improvement hill climbing; level-only search).
        """
        super().__init__()
        if calibrate_by not in CALIBRATE_BY:
            raise ValueError(f"calibrate_by must be one of {', '.join(CALIBRATE_BY)}; got {calibrate_by!r}")
        self.save_hyperparameters(ignore=["pruner"])
        if target_level is None and sparsity is None:  # recorded as checkpoints before `sparsity` hold it
            self.hparams.target_level = DEFAULT_TARGET_LEVEL
        # every refusal of the settings, before any work (hparams may hold Lightning's own entries too)
        self.settings = SearchSettings.from_mapping(self.hparams)
        self.metric = self.settings.fitness
        self.pruner = pruner if pruner is not None else OBSPruner()
        self.automatic_optimization = False
        self._tick = nn.Parameter(torch.zeros(1))  # the no-op optimizer's parameter (see configure_optimizers)
        self._plan: RunPlan | None = None  # `check_run` makes it (from the denoiser's config)
        self.context: RunContext | None = None  # `prepare` builds it (loads the denoiser)
        self.search: EvolutionarySearch | None = None  # `setup("fit")` builds it
        self.evaluated_this_run = 0  # schedules this fit evaluated, summed over its processes
        self._statistics: dict[str, float] = {}  # the last generation's, for its plain line
        self._timer: GenerationTimer | None = None

    @property
    def space(self) -> SearchSpace | None:
        """The search space of the search (None before `setup("fit")`)."""
        return None if self.search is None else self.search.space

    # --- the run context (CLI: before fit / predict / test) ---------------------------------------
    def prepare(self, root_dir: str | Path = ".", device: torch.device | str = "cpu") -> RunContext:
        """The run context of a run in `root_dir` (`context`): loads the denoiser on `device` and fixes
        the partition and H the first time; later calls keep them and only rebind the folder."""
        if self.context is None:
            self.context = build_context(self.settings, Path(root_dir), device, depth=self.pruner.depth,
                                         pruner=self.pruner)
        elif self.context.root_dir != Path(root_dir):
            self.context = rebind_context(self.context, self.settings, Path(root_dir))
        return self.context

    def check_run(self, root_dir: str | Path = ".", datamodule: Any | None = None) -> RunPlan | None:
        """Refuses, from the denoiser's config (`builder.plan_run`) and the store's manifest, before
        the denoiser loads and before anything is written, what this run cannot do: settings the
        denoiser cannot serve, a store in the way with other stages or H, or — given the calibration
        `datamodule` — another key. Returns the plan (None: the config is not at hand before loading)."""
        if self._plan is None:
            self._plan = plan_run(self.settings, depth=self.pruner.depth, pruner=self.pruner)
        if self._plan is not None:
            key_fields = None if datamodule is None else self.store_key_fields(datamodule)
            check_existing_store(self.store_folder(root_dir), self._plan, key_fields)
            if datamodule is not None and not TrajectoryStore.exists(self.store_folder(root_dir)):
                datamodule.check_source(self._plan.adapter)  # calibration will read it: open it now
        return self._plan

    def memory_plan(self, root_dir: str | Path, datamodule: Any | None, device: torch.device | str, *,
                    weights: bool = True) -> Any | None:
        """The run's memory plan (`memory_plan.run_plan`) from the denoiser's architecture, before it
        loads: calibration (when no store is at `store_folder(root_dir)` and a `datamodule` is given),
        search and sampling on `device`. `weights=False` (`--dry_run`): planned without the hub cache
        for a hub id with a shipped config. None where no config is at hand before loading."""
        from ..memory_plan import run_plan

        plan = self._plan or plan_run(self.settings, depth=self.pruner.depth, weights=weights, pruner=self.pruner)
        if plan is None:
            return None
        calibrate = datamodule is not None and not TrajectoryStore.exists(self.store_folder(root_dir))
        self.pruner.calibrate_by(self.hparams.calibrate_by, plan.adapter, device,  # whole model or block by block
                                 self.hparams.get("stream_weights"))
        return run_plan(self.settings, plan, self.pruner, nsamples=getattr(datamodule, "nsamples", 0),
                        batch_size=getattr(datamodule, "batch_size", 1), device=device, calibrate=calibrate)

    def store_folder(self, root_dir: str | Path) -> Path:
        """The store of a run in `root_dir`: `store`, or <root_dir>/store."""
        return store_path(self.settings, Path(root_dir))

    def ensure_store(self, trainer: L.Trainer, datamodule: Any | None, log=print) -> TrajectoryStore:
        """Opens the matching store, or builds it by calibration (needs the datamodule). Streamed
        weights (decided on the architecture, before loading): the denoiser loads on the host."""
        device = trainer.strategy.root_device
        if (self.context is None and datamodule is not None
                and not TrajectoryStore.exists(self.store_folder(trainer.default_root_dir))):
            plan = self._plan or plan_run(self.settings, depth=self.pruner.depth, pruner=self.pruner)
            if plan is not None:
                self.pruner.calibrate_by(self.hparams.calibrate_by, plan.adapter, device,
                                         self.hparams.get("stream_weights"))
                if self.pruner.stream:
                    device = torch.device("cpu")  # the blocks visit the accelerator one at a time
        context = self.prepare(trainer.default_root_dir, device)
        path = context.store_path
        if datamodule is None:
            return TrajectoryStore.open(path)
        key_fields = self.store_key_fields(datamodule)
        if TrajectoryStore.exists(path):
            store = TrajectoryStore.open(path, key_fields=key_fields)  # refuses a mismatched store
            log(f"trajectory store {path} matches this run: reusing it")
            return store
        return build_store(trainer, self.pruner, datamodule, context.adapter, context.partition, path,
                           context.levels_max, log=log, calibrate_by=self.hparams.calibrate_by,
                           stream=self.hparams.get("stream_weights"))

    def calibrate(self, trainer: L.Trainer, datamodule: Any) -> TrajectoryStore:
        """`diffes-pl predict` from Python: the run's trajectory store (`store`, or
        <trainer.default_root_dir>/store), opened when one built for this run's settings is there, else
        built by calibrating on `datamodule` with `trainer` (its devices and strategy). What the run
        cannot do is refused first, before the denoiser loads (`check_run`). `trainer.fit(model)` then
        searches on this store."""
        self.check_run(trainer.default_root_dir, datamodule)
        return self.ensure_store(trainer, datamodule)

    def store_key_fields(self, datamodule: Any) -> dict:
        """What the store of this run depends on (denoiser, calibration, partition, pruner, H)."""
        known = self.context or self._plan or self.prepare()  # the plan: no weights needed for the key
        return store_key_fields(known.adapter, known.partition, datamodule.settings(), self.pruner, known.levels_max)

    # --- search ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        context = self.prepare(self.trainer.default_root_dir, self.device)
        context.adapter.denoiser.to(self.device)
        self.search = build_search(self.settings, context)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The search optimizes nothing, yet it keeps a no-op optimizer (SGD, lr 0) over one placeholder
        # parameter, stepped once per generation, because Lightning offers no cleaner way:
        # - under manual optimization `global_step` is the number of optimizer steps (by design:
        #   Lightning issues #17167, #18556), and a ModelCheckpoint skips saving while it has not moved,
        #   so a user's ModelCheckpoint would save once at most; `max_steps` and loggers' steps count
        #   it too. Returning None would step Lightning's stand-in optimizer instead (with a warning),
        #   but would not remove the placeholder, because
        # - the DDP strategy wraps the module in DistributedDataParallel, which refuses a module that
        #   has no parameter requiring a gradient (`--trainer.strategy ddp` splits the evaluations).
        return torch.optim.SGD([self._tick], lr=0.0)

    def configure_callbacks(self):
        callbacks = []
        if self.settings.stop_patience is not None:  # stop when converged: Lightning's own EarlyStopping
            from lightning.pytorch.callbacks import EarlyStopping

            callbacks.append(EarlyStopping(monitor="best_fitness", mode="max" if self.metric.higher_is_better else "min",
                                           patience=self.settings.stop_patience, min_delta=self.settings.stop_delta,
                                           check_on_train_epoch_end=True, strict=True))
        # the CLI gives the Trainer a checkpoint already (so Lightning adds no default ModelCheckpoint)
        if not any(isinstance(c, GenerationCheckpoint) for c in self.trainer.callbacks):
            callbacks.append(GenerationCheckpoint())
        return callbacks

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer driving this module, or None (a module used on its own)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's answer for a module not attached to a Trainer
            return None

    def stop_reason(self) -> str | None:
        """Why the search stopped before its last generation (stop_patience), or None."""
        from lightning.pytorch.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason

        trainer = self.attached_trainer()
        for callback in trainer.callbacks if trainer is not None else []:
            if isinstance(callback, EarlyStopping) and callback.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
                return (f"converged: best {self.metric.name} improved by no more than {callback.min_delta:g} "
                        f"in {callback.patience} generations (stopped after generation {callback.stopped_epoch + 1})")
        return None

    def on_train_end(self) -> None:
        # stopped early by convergence, or every generation done (also a resume that had none left):
        # the search is finished
        if self.search is not None and (self.stop_reason() is not None or
                                        self.current_epoch >= (self.trainer.max_epochs or 0)):
            self.write_outputs(finished=True)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([0], batch_size=1)  # one tick per generation

    def training_step(self, batch: Any, batch_idx: int) -> None:
        statistics = self.search.step(self._sum_over_ranks if self.trainer.world_size > 1 else None,
                                      rank=self.global_rank, world=self.trainer.world_size,
                                      before_each=self._stop_if_terminated)
        self.optimizers().step()  # no-op: makes `global_step` count generations
        # every process holds the same (already summed) statistics: `max` over ranks returns them
        # exactly where a mean could round, and sync_dist keeps Lightning's DDP warning away
        self.log_dict(statistics, prog_bar=True, on_epoch=True, on_step=False, batch_size=1, sync_dist=True,
                      reduce_fx="max")
        self._statistics = statistics
        here = torch.tensor([float(self.search.evaluated_here)])
        self.evaluated_this_run = int(self._sum_over_ranks(here).item() if self.trainer.world_size > 1 else here.item())

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Each slot of a generation's results is non-zero on one rank only: the sum is exact."""
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum").cpu()

    def _stop_if_terminated(self) -> None:
        """A SIGTERM or Ctrl-C stops a single-process search between two rollouts: the generation under way is
        dropped (nothing of it is saved) and the previous generation's checkpoint stands. Several
        processes stop at the generation's end instead, where Lightning agrees on it across ranks."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self.trainer.world_size == 1 and self.trainer.received_sigterm:
            raise SIGTERMException()

    def on_train_start(self) -> None:
        self._timer = GenerationTimer(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        last = self.current_epoch + 1 >= (self.trainer.max_epochs or 0)
        self.write_outputs(finished=last)
        self._print_generation_line()

    def _print_generation_line(self) -> None:
        """One plain line per generation where no live display shows it (search/progress_line.py)."""
        trainer = self.trainer
        if self.global_rank != 0 or not self._statistics or not wants_plain_lines(trainer.progress_bar_callback):
            return
        done, total = self.current_epoch + 1, int(trainer.max_epochs or 0)
        print(generation_line(done, total, self._statistics, self.metric.name, self._timer.elapsed(),
                              self._timer.eta(done, total)), flush=True)

    def best_schedule(self) -> Schedule:
        """The best schedule so far, with what it was searched on (store, pruner, metric)."""
        search, context = self.search, self.context
        return search.schedule(search.best, store=str(context.store_path.resolve()), pruner=self.pruner.name,
                               metric=context.metric.name, fitness=search.best_fitness, extra=self._extra(),
                               store_key=context.store.key)

    def _extra(self) -> dict:
        """schedule.json's `extra`: generations run, whether finished, what the search cost and, if it
        stopped early, why."""
        extra = {"generations": self.search.generation, "finished": False, "cost": self.search.cost()}
        if self.settings.race_probes is not None:
            extra["racing"] = {"probes": self.settings.race_probes, "of": self.settings.num_probes,
                               "confidence": self.settings.race_confidence}
        reason = self.stop_reason()
        if reason is not None:
            extra["stopped"] = reason
        return extra

    def write_outputs(self, finished: bool) -> None:
        """schedule.json (best so far; `extra.finished` says whether the search completed) and
        evaluations.jsonl (one line per evaluated schedule), both atomically, rank 0 only."""
        if self.global_rank != 0 or not self.search.survivors:
            return
        schedule = self.best_schedule()
        schedule.extra["finished"] = finished
        root = self.context.root_dir
        schedule.save(root / "schedule.json")
        with atomic_path(root / "evaluations.jsonl") as tmp:
            tmp.write_text(evaluation_lines(self.search.archive))

    # --- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffes"] = {**self.search.state_dict(), "store_key": self.context.store.key,
                                "stopped": self.stop_reason()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.search.load_state_dict(checkpoint["diffes"])

