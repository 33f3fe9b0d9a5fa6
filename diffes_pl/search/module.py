"""DiffES: the LightningModule of a Diff-ES run.

`predict` calibrates and builds the trajectory store (the pruner's predict epochs, one per stage).
`fit` runs the evolutionary search: ONE GENERATION PER EPOCH (`max_epochs` = generations), manual
optimization with a no-op optimizer stepped once per generation so that `global_step` counts
generations; `GenerationCheckpoint` (search/resume.py) saves `<run>/checkpoints/last.ckpt` after every
generation. The checkpoint holds the survivors, the fitness cache, the archive, the stage-entry
latents of the survivors and the search's own `torch.Generator` state, so a run killed at any point
and resumed with `--ckpt_path last` ends exactly as an uninterrupted one. A SIGTERM (a cluster's
preemption) stops the search at once: the generation under way is dropped, the last checkpoint stands.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ..denoisers import check_name, load_denoiser
from ..denoisers.base import DenoiserAdapter
from ..fitness import FitnessInputs, get_metric
from ..io import atomic_path
from ..partition import Schedule, ScheduleError, StagePartition, check_target
from ..pruners.base import Pruner, build_store, store_key_fields
from ..pruners.obs import OBSPruner
from ..trajectory import TrajectoryStore
from . import population as pop
from .resume import GenerationCheckpoint
from .rollouts import Probes, RolloutEngine

INITS = ("hybrid", "uniform", "random", "patterned")


class DiffES(L.LightningModule):
    """Stage-wise structural pruning by evolutionary search (one generation per epoch)."""

    def __init__(
        self,
        denoiser: str = "tiny-digits",
        pruner: Pruner | None = None,
        target_level: float = 4,
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
        seeds: list[list[int]] | None = None,
        metric: str = "ssim",
        num_probes: int = 64,
        probe_seed: int = 1234,
        probe_batch_size: int | None = None,
        search_seed: int = 0,
        dtype: str = "float32",
        resident_routing: bool = True,
        prompts: list[str] | None = None,
    ) -> None:
        """
        Args:
            denoiser: `tiny-digits`, a hub id (`facebook/DiT-XL-2-256`) or a local folder.
            pruner: how units are ranked per stage (obs, wanda, magnitude, activation, depth).
            target_level: the budget: the step-weighted mean level of every schedule.
            levels: H, the number of levels (default: head count of the narrowest attention, or
                the block count for depth pruning). Level L removes round(L/H · n) units per group.
            num_stages: S, contiguous groups of sampling steps (stage 0 = first steps).
            steps: sampling steps. sampler: `ddim`, `dpm` or `euler_a`. guidance: CFG scale.
            store: trajectory store folder (default: <default_root_dir>/store); one store can serve
                many searches.
            offspring: children per generation. survivors: individuals kept (elitist).
            max_move: largest level-switch move. moves_per_child: moves applied per child.
            init: initial population: hybrid (uniform + patterned + random), uniform, random, patterned.
            seeds: user schedules put into the initial population.
            metric: fitness: ssim, psnr, latent_mse, class_accuracy, digits_fid, topiq, clipiqa, or
                `package.module:function`.
            num_probes: probes (seeded noise + labels) the fitness is measured on.
            probe_seed: seed of the probes. probe_batch_size: probes per denoiser call.
            search_seed: seed of the search's own generator (population, mutation).
            dtype: inference dtype of the denoiser (float32, float16, bfloat16).
            resident_routing: keep every stage's sliced weights of a candidate resident (fastest);
                false shares one buffer per layer, refilled at stage boundaries (the search's peak
                memory drops to about one pruned copy on top of the dense model; same fitness).
            prompts: probe prompts of text-conditioned denoisers (SDXL, FLUX; required there, refused
                elsewhere): probe i is prompts[i % len(prompts)] with its own seeded latent, encoded
                once by the denoiser's text encoders; CFG's unconditional half is the adapter's null
                condition.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["pruner"])
        self.pruner = pruner if pruner is not None else OBSPruner()
        self.automatic_optimization = False
        self._validate()
        self._tick = nn.Parameter(torch.zeros(1))  # the no-op optimizer's parameter
        self.adapter: DenoiserAdapter | None = None
        self.survivors: list[tuple[int, ...]] = []
        self.fitness: dict[tuple[int, ...], float] = {}
        self.archive: list[dict] = []
        self.entries: dict[tuple[int, ...], list[Tensor]] = {}
        self.generator = torch.Generator().manual_seed(search_seed)
        self.finished = False
        self.nfe_history: list[int] = []
        self.evaluated_here = 0  # schedules evaluated by this process (a resumed run restores the rest)

    # --- validation before any work ------------------------------------------------------------
    def _validate(self) -> None:
        hp = self.hparams
        problems = []
        if hp.num_probes < 1:
            problems.append(f"num_probes must be ≥ 1 (got {hp.num_probes})")
        if hp.offspring < 1 or hp.survivors < 1:
            problems.append(f"offspring and survivors must be ≥ 1 (got {hp.offspring}, {hp.survivors})")
        if hp.max_move < 1 or hp.moves_per_child < 1:
            problems.append("max_move and moves_per_child must be ≥ 1")
        if hp.init not in INITS:
            problems.append(f"init must be one of {INITS} (got {hp.init!r})")
        if hp.levels is not None and hp.levels < 1:
            problems.append(f"levels (H) must be ≥ 1 (got {hp.levels})")
        if hp.levels is not None and not 0 <= hp.target_level <= hp.levels:
            problems.append(f"target_level {hp.target_level} is above H = {hp.levels}: choose target_level ≤ levels")
        if hp.dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"dtype must be float32, float16 or bfloat16 (got {hp.dtype!r})")
        if problems:
            raise ValueError("; ".join(problems))
        self.metric = get_metric(hp.metric)  # unknown metric → ValueError now
        family = check_name(hp.denoiser).family  # unknown model / missing folder → error now
        text = family.conditioning == "text"
        if hp.prompts is not None and (not isinstance(hp.prompts, (list, tuple)) or
                                       not all(isinstance(p, str) and p.strip() for p in hp.prompts)):
            raise ValueError(f"prompts must be a list of non-empty strings (got {hp.prompts!r})")
        if text and not hp.prompts:
            raise ValueError(f"{hp.denoiser} is text-conditioned: set model.prompts to the probe prompts "
                             "(a list of strings; the paper uses 4)")
        if not text and hp.prompts:
            raise ValueError(f"{hp.denoiser} is class-conditional: model.prompts is for text-conditioned denoisers "
                             "(SDXL, FLUX); remove it")

    # --- preparation (CLI: before fit / predict / test) --------------------------------------
    @property
    def run_dir(self) -> Path:
        if self._trainer is not None:
            return Path(self.trainer.default_root_dir)
        return Path(getattr(self, "_root_dir", "."))

    @property
    def store_path(self) -> Path:
        return Path(self.hparams.store) if self.hparams.store else self.run_dir / "store"

    def load(self, device: torch.device | str = "cpu") -> DenoiserAdapter:
        """Loads the denoiser and fixes the partition and H (idempotent)."""
        if self.adapter is None:
            hp = self.hparams
            adapter = load_denoiser(hp.denoiser, device=device, dtype=getattr(torch, hp.dtype))
            object.__setattr__(self, "adapter", adapter)  # the denoiser is not part of this module's state
            scheduler = adapter.make_scheduler(hp.sampler)
            self.partition = StagePartition.from_scheduler(scheduler, hp.steps, hp.num_stages)
            default = adapter.default_levels("depth" if self.pruner.depth else "width")
            self.levels_max = int(hp.levels or default)
            check_target(hp.target_level, self.levels_max, self.partition.steps_per_stage)
        return self.adapter

    def ensure_store(self, trainer: L.Trainer, datamodule: Any | None, log=print) -> TrajectoryStore:
        """Opens the matching store, or builds it by calibration (needs the datamodule)."""
        self._root_dir = trainer.default_root_dir
        adapter = self.load(trainer.strategy.root_device)
        path = self.store_path
        if datamodule is None:
            return TrajectoryStore.open(path)
        key_fields = self.store_key_fields(datamodule)
        if TrajectoryStore.exists(path):
            store = TrajectoryStore.open(path, key_fields=key_fields)  # refuses a mismatched store
            log(f"trajectory store {path} matches this run: reusing it")
            return store
        return build_store(trainer, self.pruner, datamodule, adapter, self.partition, path, self.levels_max, log=log)

    def store_key_fields(self, datamodule: Any) -> dict:
        """What the store of this run depends on (denoiser, calibration, partition, pruner, H)."""
        return store_key_fields(self.load(), self.partition, datamodule.settings(), self.pruner, self.levels_max)

    # --- search ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        adapter = self.load(self.device)
        adapter.denoiser.to(self.device)
        self.store = TrajectoryStore.open(self.store_path)
        if self.store.levels_max != self.levels_max or self.store.num_stages != self.partition.num_stages:
            raise ScheduleError(f"the store at {self.store_path} has H = {self.store.levels_max} and "
                                f"{self.store.num_stages} stages; this run needs H = {self.levels_max} and "
                                f"{self.partition.num_stages} stages")
        hp = self.hparams
        self.probes = Probes.make(adapter, hp.num_probes, hp.probe_seed, prompts=hp.prompts)
        self.engine = RolloutEngine(adapter, self.store, self.partition, self.probes, sampler=hp.sampler,
                                    guidance=hp.guidance, batch_size=hp.probe_batch_size,
                                    levels_max=self.levels_max, target_level=hp.target_level,
                                    resident=hp.resident_routing)
        self.reference_latents, _ = self.engine.run(None)
        self.reference_images = adapter.decode(self.reference_latents.to(self.device)).cpu()
        self.engine.nfe = 0

    def configure_optimizers(self):
        return torch.optim.SGD([self._tick], lr=0.0)

    def configure_callbacks(self):
        # the CLI gives the Trainer one already (so Lightning adds no default ModelCheckpoint)
        return [] if any(isinstance(c, GenerationCheckpoint) for c in self.trainer.callbacks) else [GenerationCheckpoint()]

    def train_dataloader(self):
        return torch.utils.data.DataLoader([0], batch_size=1)  # one tick per generation

    def evaluate(self, levels: tuple[int, ...], parent: tuple[int, ...] | None = None) -> tuple[float, int]:
        """Fitness of a schedule (cached) and the denoiser steps it cost.

        The rollout starts from the longest stage prefix shared with any schedule whose stage-entry
        latents are cached (the survivors and this generation's evaluated schedules — the parent
        among them): the latents entering stage k depend only on the levels of stages < k, so the
        result is identical to a full rollout. `parent` is kept for the archive; it needs no special
        treatment here."""
        if levels in self.fitness:
            return self.fitness[levels], 0
        start, cached = 0, None
        if self.engine.resumable:
            for source, entries in self.entries.items():
                shared = pop.first_changed_stage(source, levels)
                if shared > start:
                    start, cached = shared, entries
        before = self.engine.nfe
        latents, entries = self.engine.run(levels, start, cached if start else None)
        images = self.adapter.decode(latents.to(self.device)).cpu()
        value = self.metric(FitnessInputs(images, latents, self.reference_images, self.reference_latents,
                                          self.probes.conditions))
        self.fitness[levels] = value
        self.entries[levels] = entries
        return value, self.engine.nfe - before

    def evaluate_generation(self, candidates: list, generation: int) -> int:
        """Evaluates the generation's new schedules, split across ranks (rank r takes every W-th),
        then shares the fitness values so every rank holds the same cache and archive. Returns the
        denoiser steps spent (all ranks together)."""
        todo, seen = [], set()
        for levels, parent in candidates:
            if levels not in self.fitness and levels not in seen:
                seen.add(levels)
                todo.append((levels, parent))
        world, rank = self.trainer.world_size, self.global_rank
        values = torch.zeros(len(todo), dtype=torch.float64)
        nfes = torch.zeros(len(todo), dtype=torch.float64)
        for i in range(rank, len(todo), world):
            self._stop_if_terminated()
            values[i], nfes[i] = self.evaluate(*todo[i])
            self.evaluated_here += 1
        if world > 1:  # each slot is non-zero on one rank only: the sum is exact
            values = self.trainer.strategy.reduce(values.to(self.device), reduce_op="sum").cpu()
            nfes = self.trainer.strategy.reduce(nfes.to(self.device), reduce_op="sum").cpu()
        for i, (levels, parent) in enumerate(todo):
            value = float(values[i])
            self.fitness[levels] = value
            self.archive.append({"generation": generation, "levels": list(levels), "fitness": value,
                                 "nfe": int(nfes[i]), "parent": list(parent) if parent is not None else None})
        return int(nfes.sum())

    def _stop_if_terminated(self) -> None:
        """A SIGTERM stops a single-process search between two rollouts: the generation under way is
        dropped (nothing of it is saved) and the previous generation's checkpoint stands. Several
        processes stop at the generation's end instead, where Lightning agrees on it across ranks."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self.trainer.world_size == 1 and self.trainer.received_sigterm:
            raise SIGTERMException()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        H, w = self.levels_max, self.partition.steps_per_stage
        generation = self.current_epoch
        if generation == 0 and not self.survivors:
            seeds = [tuple(s) for s in (hp.seeds or [])]
            candidates = [(ind, None) for ind in pop.initial_population(
                hp.offspring + hp.survivors, len(w), H, hp.target_level, w, self.generator, init=hp.init, seeds=seeds)]
        else:
            candidates = pop.next_generation(self.survivors, hp.offspring, H, w, self.generator, hp.max_move,
                                             hp.moves_per_child, set(self.fitness))
        nfe_generation = self.evaluate_generation(candidates, generation)
        pool = {ind: self.metric.score(self.fitness[ind]) for ind in {*self.survivors, *(c for c, _ in candidates)}}
        self.survivors = pop.select(pool, hp.survivors, higher_is_better=True)
        self.entries = {ind: self.entries[ind] for ind in self.survivors if ind in self.entries}
        self.optimizers().step()  # no-op: makes global_step count generations
        best = self.survivors[0]
        self.nfe_history = self.nfe_history + [nfe_generation]
        values = torch.tensor([self.fitness[c] for c, _ in candidates], dtype=torch.float64)
        self.log_dict({"best_fitness": float(self.fitness[best]), "median_fitness": float(values.median()),
                       "evaluated": float(sum(1 for r in self.archive if r["generation"] == generation)),
                       "nfe": float(nfe_generation), "nfe_total": float(sum(self.nfe_history))},
                      prog_bar=True, on_epoch=True, on_step=False, batch_size=1)

    def on_train_epoch_end(self) -> None:
        last = self.current_epoch + 1 >= (self.trainer.max_epochs or 0)
        self.write_outputs(finished=last)

    def best_schedule(self) -> Schedule:
        best = self.survivors[0]
        return Schedule(list(best), self.levels_max, self.hparams.target_level, self.partition.steps_per_stage,
                        partition=self.partition.to_dict(), store=str(self.store_path.resolve()), pruner=self.pruner.name,
                        metric=self.hparams.metric, fitness=float(self.fitness[best]),
                        extra={"generations": self.current_epoch + 1, "finished": False}, store_key=self.store.key)

    def write_outputs(self, finished: bool) -> None:
        """schedule.json (best so far; `extra.finished` says whether the search completed) and
        evaluations.jsonl (one line per evaluated schedule), both atomically, rank 0 only."""
        if self.global_rank != 0 or not self.survivors:
            return
        schedule = self.best_schedule()
        schedule.extra["finished"] = finished
        schedule.save(self.run_dir / "schedule.json")
        with atomic_path(self.run_dir / "evaluations.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.archive))

    # --- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffes"] = {
            "survivors": [list(s) for s in self.survivors],
            "fitness": [[list(k), v] for k, v in self.fitness.items()],
            "archive": self.archive,
            "entries": {json.dumps(list(k)): v for k, v in self.entries.items()},
            "generator": self.generator.get_state(),
            "nfe_history": self.nfe_history,
            "store_key": self.store.key,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["diffes"]
        self.survivors = [tuple(s) for s in state["survivors"]]
        self.fitness = {tuple(k): v for k, v in state["fitness"]}
        self.archive = state["archive"]
        self.entries = {tuple(json.loads(k)): v for k, v in state["entries"].items()}
        self.generator.set_state(state["generator"])
        self.nfe_history = state["nfe_history"]
