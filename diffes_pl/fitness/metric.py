"""What a fitness metric is (`Metric`) and what it scores (`FitnessInputs`): the metrics of this
package (`fitness/__init__.py`, `fitness/iqa.py`) and a user's callables share them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


@dataclass
class FitnessInputs:
    images: Tensor  # [P, C, H, W] in [0, 1], the candidate's samples
    latents: Tensor  # [P, C, h, w], final latents
    reference_images: Tensor  # the dense model's samples on the same probes
    reference_latents: Tensor
    conditions: Any  # labels or prompts of the probes


@dataclass(frozen=True)
class Metric:
    """A fitness metric. `per_probe` (optional) gives one value per probe [P], higher is better, whose
    mean orders schedules as the metric does: what racing (`search.racing`) compares on a probe subset.
    Metrics without it (digits-FID, a set statistic) cannot be raced."""

    name: str
    fn: Callable[[FitnessInputs], float]
    higher_is_better: bool
    per_probe: Callable[[FitnessInputs], Tensor] | None = None

    def __call__(self, inputs: FitnessInputs) -> float:
        return float(self.fn(inputs))

    def probe_values(self, inputs: FitnessInputs) -> Tensor:
        """[P] float64 per-probe values (higher is better); ValueError if the metric has none."""
        if self.per_probe is None:
            raise ValueError(f"fitness metric {self.name!r} has no per-probe values, so it cannot be raced: use ssim, "
                             "psnr, latent_mse, class_accuracy, class_confidence, ssim_confidence, topiq or clipiqa, "
                             "or turn racing off (race_probes: null)")
        return self.per_probe(inputs).detach().double().cpu().reshape(-1)

    def score(self, value: float) -> float:
        """The value oriented so that higher is better (what selection maximises)."""
        return value if self.higher_is_better else -value
