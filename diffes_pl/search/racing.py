"""Racing (multi-fidelity fitness): a child is first scored on a subset of the probes and finishes on
all of them only if it can still reach the survivors.

The rule (a one-sided confidence bound on paired per-probe differences): the bar is the worst
survivor (the "cut"), whose per-probe values on every probe are known. On the subset's m probes the
child's per-probe values (`Metric.per_probe`, higher is better, their mean orders schedules as the
metric does) are compared with the cut's on the SAME probes: d_i = child_i − cut_i. The child goes on
to the remaining probes when

    mean(d) + z · sd(d) / √m · √(1 − m / P)  ≥  0

i.e. when, with confidence z, its full-probe mean could still reach the cut's (√(1 − m/P): the
subset is m of the P probes, the finite-population correction; it is 0 at m = P). Pairing removes
what the probes have in common (hard probes are hard for every schedule), so a small subset
separates hopeless children from contenders.

Selection never rests on the subset: a child that stops early is not in the pool; survivors are
always compared on their full-probe fitness. When the subset orders a child and the cut as the full
set does, racing keeps exactly the survivors a full evaluation keeps (a child below the cut cannot
displace any survivor; one above it is promoted because its subset mean is ≥ 0).

In the first generation there are no survivors yet: the cut is then the μ-th best newcomer on the
first rung (μ = survivors). It passes every rung against itself (d = 0), so at least μ schedules are
scored on all probes, and when the subset orders schedules as the full set does the μ best on the
subset are the μ best on all probes.

Successive rungs (`probes=(8, 16)`): a child is scored on the first 8 probes, the ones that pass go
on to probes 8–15 and are judged again on all 16 (the same bound with m = 16), and only those that
pass again finish on all P. A contender that a second look on more probes shows hopeless then costs
16 probes instead of P. Every rung uses the same rule against the same cut, so the constructed-case
guarantee above holds rung by rung.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Racing:
    """Race children on the first `probes` of the P probes; `confidence` is z. `probes` is one subset
    size m (2 ≤ m < P) or increasing rungs (m1, m2, …): a child must pass the bound at every rung."""

    probes: int | tuple[int, ...]
    confidence: float = 2.0

    def __post_init__(self) -> None:
        rungs = self.probes if isinstance(self.probes, (list, tuple)) else (self.probes,)
        if not rungs or any(isinstance(m, bool) or not isinstance(m, int) or m < 2 for m in rungs):
            raise ValueError(f"race_probes must be a whole number ≥ 2, or a list of them (got {self.probes!r}): the "
                             "bound needs a spread of per-probe differences")
        if list(rungs) != sorted(set(rungs)):
            raise ValueError(f"race_probes rungs must increase (got {list(rungs)}), e.g. [8, 16]: each rung scores a "
                             "promoted child on more probes")
        object.__setattr__(self, "probes", rungs[0] if len(rungs) == 1 else tuple(rungs))
        if not self.confidence >= 0:
            raise ValueError(f"race_confidence (z) must be ≥ 0 (got {self.confidence!r})")

    @property
    def rungs(self) -> tuple[int, ...]:
        """The subset sizes a child is judged at, increasing (the last below P)."""
        return self.probes if isinstance(self.probes, tuple) else (self.probes,)

    def check(self, num_probes: int) -> None:
        if self.rungs[-1] >= num_probes:
            raise ValueError(f"race_probes {self.probes} must be below num_probes {num_probes}: racing scores "
                             "children on a subset first; set race_probes to about a quarter of num_probes")

    def bounds(self, num_probes: int) -> tuple[int, ...]:
        """Probe-index boundaries of the rounds: (0, m1, …, P); round r scores probes [b_r, b_r+1)."""
        return (0, *self.rungs, num_probes)

    def batch_divisor(self, batch_size: int) -> int:
        """The largest probe batch ≤ `batch_size` that divides every rung: each round's batches are
        then the very batches of a full rollout."""
        g = math.gcd(*self.rungs)
        return max(d for d in range(1, min(g, batch_size) + 1) if g % d == 0)

    def bound(self, child: Tensor, cut: Tensor, num_probes: int) -> float:
        """The upper confidence bound of the child's full-probe mean minus the cut's (≥ 0: promote).
        child, cut: [m] per-probe values on the subset."""
        d = child.double() - cut.double()
        m = len(d)
        sd = float(d.std()) if m > 1 else 0.0
        return float(d.mean()) + self.confidence * sd / math.sqrt(m) * math.sqrt(max(0.0, 1 - m / num_probes))

    def can_reach(self, child: Tensor, cut: Tensor, num_probes: int) -> bool:
        return self.bound(child, cut, num_probes) >= 0
