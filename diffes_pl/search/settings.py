"""What a Diff-ES search is asked to do, checked when it is made: `SearchSettings`.

Every refusal of the settings alone (numbers out of range, an unknown metric or model, prompts for
a class-conditional model, cache settings without `cache_intervals`) comes at once, in one line,
before any model is loaded. What needs the loaded denoiser (H, the cache branch) is checked by
`check_denoiser` right after loading, before calibration. `DiffES` (lightning_module.py) takes the
same arguments, for LightningCLI's parsing and --help, and hands them here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..denoisers import check_name
from ..denoisers.base import BlockCachePoints, DenoiserAdapter, UNetCachePoints
from ..denoisers.registry import family_titles
from ..denoisers.tiny import NAME as BUILTIN
from ..fitness import Metric, get_metric
from ..partition import split_steps
from .joint_space import JOINT_INITS, interval_rate_problem
from .level_space import INITS
from .racing import Racing

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class SearchSettings:
    """The settings of one search (the arguments of `DiffES`; their docstring says what each means).
    `fitness` is the resolved metric."""

    denoiser: str = BUILTIN
    target_level: float = 4
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
        if self.levels is not None and not 0 <= self.target_level <= self.levels:
            problems.append(f"target_level {self.target_level} is above H = {self.levels}: choose target_level ≤ "
                            "levels")
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
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be float32, float16 or bfloat16 (got {self.dtype!r})")
        return problems

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
