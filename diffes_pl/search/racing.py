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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Racing:
    """Race children on the first `probes` of the P probes (1 ≤ probes < P); `confidence` is z."""

    probes: int
    confidence: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 2:
            raise ValueError(f"race_probes must be a whole number ≥ 2 (got {self.probes!r}): the bound needs a "
                             "spread of per-probe differences")
        if not self.confidence >= 0:
            raise ValueError(f"race_confidence (z) must be ≥ 0 (got {self.confidence!r})")

    def check(self, num_probes: int) -> None:
        if self.probes >= num_probes:
            raise ValueError(f"race_probes {self.probes} must be below num_probes {num_probes}: racing scores "
                             "children on a subset first; set race_probes to about a quarter of num_probes")

    def subset(self, num_probes: int) -> Tensor:
        """Indices of the first-round probes [m]."""
        return torch.arange(self.probes)

    def rest(self, num_probes: int) -> Tensor:
        """Indices of the probes a promoted child is scored on next [P − m]."""
        return torch.arange(self.probes, num_probes)

    def bound(self, child: Tensor, cut: Tensor, num_probes: int) -> float:
        """The upper confidence bound of the child's full-probe mean minus the cut's (≥ 0: promote).
        child, cut: [m] per-probe values on the subset."""
        d = child.double() - cut.double()
        m = len(d)
        sd = float(d.std()) if m > 1 else 0.0
        return float(d.mean()) + self.confidence * sd / math.sqrt(m) * math.sqrt(max(0.0, 1 - m / num_probes))

    def can_reach(self, child: Tensor, cut: Tensor, num_probes: int) -> bool:
        return self.bound(child, cut, num_probes) >= 0
