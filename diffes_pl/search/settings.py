"""What a Diff-ES search is asked to do, checked when it is made: `SearchSettings`.

Every refusal of the settings alone (numbers out of range, an unknown metric or model, prompts for
a class-conditional model, cache settings without `cache_intervals`) comes at once, in one line,
before any model is loaded. What needs the loaded denoiser (H, the cache branch) is checked by
`check_denoiser` right after loading, before calibration. `DiffES` (lightning_module.py) takes the
same arguments, for LightningCLI's parsing and --help, and hands them here.

The budget is given either as `target_level` (a step-weighted mean level of H) or as `sparsity`
(the fraction of the prunable units removed, target_level / H); `target_level_for(H)` turns either
into the level, and refuses both when they disagree. H may only be known once the denoiser's
config is read (`builder.plan_run`), so with `levels` unset the sparsity is converted there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

from ..denoisers import check_name
from ..denoisers.base import BlockCachePoints, DenoiserAdapter, UNetCachePoints
from ..denoisers.registry import family_titles
from ..denoisers.tiny import NAME as BUILTIN
from ..errors import ScheduleError
from ..fitness import Metric, get_metric
from ..partition import split_steps
from ..schedule import check_target
from .joint_space import JOINT_INITS, interval_rate_problem
from .level_space import INITS
from .evolution import PROPOSALS
from .racing import Racing

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TARGET_LEVEL = 4  # the budget when neither target_level nor sparsity is given (what it always was)


@dataclass
class SearchSettings:
    """The settings of one search (the arguments of `DiffES`; their docstring says what each means).
    `fitness` is the resolved metric."""

    denoiser: str = BUILTIN
    target_level: float | None = None
    levels: int | None = None
    num_stages: int = 10
    steps: int = 20
    sampler: str = "ddim"
    guidance: float = 2.0
    store: str | None = None
    offspring: int = 16
    survivors: int = 4
    max_move: int = 5
    moves_per_child: int = 1
    init: str = "hybrid"
    seeds: list | None = None
    metric: str = "ssim"
    num_probes: int = 64
    probe_seed: int = 1234
    probe_batch_size: int | None = None
    search_seed: int = 0
    dtype: str = "float32"
    resident_routing: bool = True
    prompts: list[str] | None = None
    cache_intervals: list[int] | None = None
    cache_branch: int | None = None
    mac_budget: float | None = None
    interval_rate: float | None = None
    race_probes: int | list[int] | None = None
    race_confidence: float = 2.0
    stop_patience: int | None = None
    stop_delta: float = 0.0
    batch_candidates: bool = False
    proposal: str = "evolution"
    sparsity: float | None = None
    fitness: Metric = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.fitness = get_metric(self.metric)  # unknown metric → ValueError now
        if self.race_probes is not None and self.fitness.per_probe is None:
            self.fitness.probe_values(None)  # raises: this metric cannot be raced (names the ones that can)
        family = check_name(self.denoiser).family  # unknown model / missing folder → error now
        text = family.conditioning == "text"
        if self.prompts is not None and (not isinstance(self.prompts, (list, tuple)) or
                                         not all(isinstance(p, str) and p.strip() for p in self.prompts)):
            raise ValueError(f"prompts must be a list of non-empty strings (got {self.prompts!r})")
        if text and not self.prompts:
            raise ValueError(f"{self.denoiser} is text-conditioned: set model.prompts to the probe prompts "
                             "(a list of strings; the paper uses 4)")
        if not text and self.prompts:
            raise ValueError(f"{self.denoiser} is class-conditional: model.prompts is for text-conditioned denoisers "
                             f"({family_titles(conditioning='text')}); remove it")

    def _problems(self) -> list[str]:
        """One-line refusals of the settings alone."""
        problems = []
        try:
            split_steps(self.steps, self.num_stages)
        except ValueError as err:
            problems.append(str(err))
        if self.num_probes < 1:
            problems.append(f"num_probes must be ≥ 1 (got {self.num_probes})")
        if self.offspring < 1 or self.survivors < 1:
            problems.append(f"offspring and survivors must be ≥ 1 (got {self.offspring}, {self.survivors})")
        if self.max_move < 1 or self.moves_per_child < 1:
            problems.append("max_move and moves_per_child must be ≥ 1")
        if self.init not in INITS:
            problems.append(f"init must be one of {INITS} (got {self.init!r})")
        if self.levels is not None and self.levels < 1:
            problems.append(f"levels (H) must be ≥ 1 (got {self.levels})")
        problems += self._budget_problems()
        problems += self._cache_problems()
        if self.race_probes is not None:
            try:
                Racing(self.race_probes, self.race_confidence).check(self.num_probes)
            except ValueError as err:
                problems.append(str(err))
        patience = self.stop_patience
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            problems.append(f"stop_patience must be a whole number ≥ 1 of generations (got {patience!r}); "
                            "null runs every generation")
        if not self.stop_delta >= 0:
            problems.append(f"stop_delta must be ≥ 0 (got {self.stop_delta!r})")
        if self.proposal not in PROPOSALS:
            problems.append(f"proposal must be one of {', '.join(PROPOSALS)} (got {self.proposal!r})")
        elif self.proposal == "greedy" and self.cache_intervals is not None:
            problems.append("proposal greedy climbs from the uniform level schedule: it is for the level-only search "
                            "(remove cache_intervals, or use proposal evolution or random)")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be float32, float16 or bfloat16 (got {self.dtype!r})")
        return problems

    def _budget_problems(self) -> list[str]:
        """One-line refusals of target_level / sparsity that need no denoiser (with `levels` given, H is
        known now, so a disagreement is refused here too)."""
        s, t = self.sparsity, self.target_level
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1):
            problem = "sparsity must be a fraction in [0, 1] of the prunable units removed (0.5 removes half)"
            return [f"{problem}; got {s!r}"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
            return [f"target_level must be a number ≥ 0 (the step-weighted mean level); got {t!r}"]
        if self.levels is None or self.levels < 1:
            return []
        try:
            target = self.target_level_for(self.levels)
        except ValueError as err:
            return [str(err)]
        if target > self.levels:
            return [f"target_level {float(target)} is above H = {self.levels}: choose target_level ≤ levels"]
        return []

    def target_level_for(self, levels_max: int) -> float:
        """The budget as a level of H = `levels_max`: `target_level`, or `sparsity` × H (exactly, in
        `Fraction`s of the decimals given), or DEFAULT_TARGET_LEVEL when neither is given. Both
        given and different: ValueError naming both and the fix."""
        if self.sparsity is None:
            return float(DEFAULT_TARGET_LEVEL if self.target_level is None else self.target_level)
        level = Fraction(str(self.sparsity)) * int(levels_max)
        if self.target_level is not None and Fraction(str(self.target_level)) != level:
            given = float(Fraction(str(self.target_level)) / levels_max)
            raise ValueError(f"model.sparsity {self.sparsity} is target_level {float(level):g} of H = {levels_max}, "
                             f"but model.target_level is {self.target_level} (sparsity {given:g}): give one of "
                             "them (--model.target_level null to budget by sparsity)")
        return float(level)

    def check_budget(self, levels_max: int, steps_per_stage: Sequence[int]) -> float:
        """The target level of H = `levels_max` (`target_level_for`), refused (ScheduleError) when no
        schedule of whole levels on these stages meets it; a sparsity is named as given, with the
        nearest budgets that some schedule meets."""
        target = self.target_level_for(levels_max)
        if self.sparsity is not None:
            H, w = int(levels_max), list(steps_per_stage)
            need = Fraction(str(self.sparsity)) * H * sum(w)  # the Σ levels·steps this sparsity asks for
            reach = {0}  # every Σ levels·steps some schedule has (as schedule.check_target computes it)
            for steps in w:
                reach = {r + level * steps for r in reach for level in range(H + 1)}
            if need not in reach:
                near = sorted({max((r for r in reach if r <= need), default=0),
                               min((r for r in reach if r >= need), default=H * sum(w))})
                shown = " or ".join(_budget_text(Fraction(r), H, sum(w)) for r in near)
                raise ScheduleError(f"model.sparsity {self.sparsity} is target level {target:g} of H = {H}, which no "
                                    f"schedule of whole levels on steps per stage {w} meets: choose {shown}")
        check_target(target, levels_max, steps_per_stage)
        return target

    def _cache_problems(self) -> list[str]:
        """One-line refusals of the cache settings."""
        problems = []
        ks = self.cache_intervals
        if ks is None:
            if self.cache_branch is not None or self.mac_budget is not None or self.interval_rate is not None:
                problems.append("cache_branch, mac_budget and interval_rate belong to the joint search: set "
                                "cache_intervals (e.g. [1, 2, 3]) too, or remove them")
            return problems
        if not isinstance(ks, (list, tuple)) or not ks or \
                any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            problems.append(f"cache_intervals must be a non-empty list of whole numbers ≥ 1 (1: no caching), e.g. "
                            f"[1, 2, 3]; got {ks!r}")
        elif len(set(ks)) != len(ks):
            problems.append(f"cache_intervals {list(ks)} repeats a value: list each interval once")
        b = self.cache_branch
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            problems.append(f"cache_branch must be a whole number ≥ 0 (the cache branch b); got {b!r}")
        m = self.mac_budget
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1):
            problems.append(f"mac_budget must be a fraction in (0, 1] of the dense trajectory's MACs; got {m!r}")
        rate_problem = interval_rate_problem(self.interval_rate)
        if rate_problem:
            problems.append(rate_problem)
        if self.init not in JOINT_INITS:
            problems.append(f"a joint search (cache_intervals set) takes init {' or '.join(JOINT_INITS)} "
                            f"(got {self.init!r})")
        return problems

    def check_denoiser(self, adapter: DenoiserAdapter) -> None:
        """Refusals that need the loaded denoiser, before calibration: a joint search's cache branch
        must be one the adapter declares."""
        if self.cache_intervals is not None:
            resolve_cache_branch(adapter, self.cache_branch)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SearchSettings":
        """The settings among `values` (a LightningModule's hparams: other entries are ignored)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.init and f.name in values})

    def as_dict(self) -> dict:
        """The settings as given (without the resolved metric)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


def _budget_text(total: Fraction, levels_max: int, steps: int) -> str:
    """A budget of Σ levels·steps = `total` as the user can type it: a sparsity when its decimal is
    exact, else the target level when its decimal is, else the sparsity rounded."""
    sparsity, level = total / (levels_max * steps), total / steps
    if Fraction(repr(float(sparsity))) == sparsity:
        return f"sparsity {float(sparsity)!r}"
    if Fraction(repr(float(level))) == level:
        return f"target_level {float(level)!r} (sparsity {float(sparsity):.4g})"
    return f"sparsity ≈ {float(sparsity):.6g}"


def resolve_cache_branch(adapter: DenoiserAdapter, branch: int | None) -> int:
    """The cache branch b of a joint search: `branch`, checked against what the adapter declares, or
    by default the middle block (block caching) / skip branch 0 (DeepCache)."""
    points = adapter.cache_points()
    if isinstance(points, BlockCachePoints):
        count, what = points.num_blocks, "blocks (block caching: the first cached block)"
        default = count // 2
    elif isinstance(points, UNetCachePoints):
        count, what = len(points.unet.down_blocks), "UNet skip branches (DeepCache)"
        default = 0
    else:
        raise ValueError(f"{adapter.name} declares cache points of type {type(points).__name__}, which no cache "
                         "implements: remove model.cache_intervals")
    if branch is None:
        return default
    if not 0 <= branch < count:
        raise ValueError(f"cache_branch {branch} is outside [0, {count}): {adapter.name} has {count} {what}")
    return int(branch)
