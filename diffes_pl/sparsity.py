"""Levels of unstructured and N:M sparsity, and the weight a level routes (issue 25).

The sparse granularities prune single weights of the linear layers inside the unit groups' modules
(`DenoiserAdapter.sparse_layers`). Levels nest as width levels do (docs/DESIGN.md, Vocabulary):

* unstructured: level ℓ of H removes round(ℓ/H · out · in) weights of each layer;
* N:M (`m`): level ℓ removes round(ℓ/H · m) of every m consecutive inputs of each row, so with
  H = m = 4 level 2 is exactly 2:4 (the pattern sparse tensor cores run), level 1 is 3:4, level 3 1:4.

Level H removes every weight (as width level H removes every unit). One stage of a store holds, per
layer, a removal-level map `<layer>.level` (uint8 [out, in]: the level 1..H at which the weight is
first removed) and, for compensating pruners (OBS), the kept weights of every level
`<layer>.values.<ℓ>` ([kept_ℓ], row-major over the kept positions). Masks nest by construction, so
the map holds every level's mask in one byte per weight. An export keeps only the levels its schedule
routes: per stage `<layer>.removed.<ℓ>`, that level's mask packed 8 weights to a byte (`pack_mask`),
beside the level's values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import units_removed

GRANULARITIES = ("unstructured", "n:m")


@dataclass(frozen=True)
class Granularity:
    """Which weights a sparse level removes: `unstructured` (any) or `n:m` (per group of `m` inputs)."""

    kind: str = "unstructured"
    m: int = 4

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.kind!r}")
        if self.kind == "n:m" and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 2):
            raise ValueError(f"m (the N:M group of consecutive inputs) must be an integer ≥ 2; got {self.m!r}")

    def default_levels(self) -> int:
        """H: 8 steps of 12.5 % (unstructured); m (N:M: one more weight of every m per level)."""
        return self.m if self.kind == "n:m" else 8

    def check(self, levels_max: int, in_features: int) -> None:
        """Refuses an H the granularity cannot realise on a layer of `in_features` inputs."""
        if self.kind == "n:m" and in_features % self.m:
            raise ValueError(f"N:M with m = {self.m} needs input widths divisible by {self.m}; a layer has {in_features}")

    def target(self, level: int, levels_max: int, shape: tuple[int, int]) -> dict:
        """The solver's target at `level` (`sparse_solver.obs_sparse` / `wanda_mask` keyword arguments):
        {"sparsity": s} or {"n_m": (n, m)}; {} when the level removes every weight."""
        out, n_in = shape
        if self.kind == "n:m":
            removed = units_removed(level, levels_max, self.m)
            return {} if removed == self.m else {"n_m": (self.m - removed, self.m)}
        removed = units_removed(level, levels_max, out * n_in)
        return {} if removed == out * n_in else {"sparsity": removed / (out * n_in)}

    def kept(self, level: int, levels_max: int, shape: tuple[int, int]) -> int:
        """Weights of an [out, in] layer kept at `level` (what its stored values hold)."""
        out, n_in = shape
        if self.kind == "n:m":
            return out * (n_in // self.m) * (self.m - units_removed(level, levels_max, self.m))
        return out * n_in - units_removed(level, levels_max, out * n_in)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "m": self.m}


def removed_mask(level_map: Tensor, level: int) -> Tensor:
    """The weights removed at `level` (bool, the map's shape): those whose removal level is 1..level."""
    return (level_map > 0) & (level_map <= level)


def pack_mask(mask: Tensor) -> Tensor:
    """bool [out, in] → uint8 [out, ceil(in / 8)], 8 weights to a byte, first weight in the high bit
    (numpy's `packbits` order), on the mask's device."""
    out, n_in = mask.shape
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -n_in % 8)).reshape(out, -1, 8)
    return (bits << _SHIFTS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, in_features: int) -> Tensor:
    """`pack_mask`'s inverse: uint8 [out, ceil(in / 8)] → bool [out, in], on the packed mask's device."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :in_features].bool()


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def level_weight(dense: Tensor, level_map: Tensor, level: int, values: Tensor | None = None) -> Tensor:
    """The [out, in] weight routed at `level`: `dense` with the removed weights zeroed, and the kept
    ones replaced by the stored compensated `values` [kept] (row-major) when given. Level 0: `dense`
    itself (no copy)."""
    if level == 0:
        return dense
    return masked_weight(dense, removed_mask(level_map, level), values)


def masked_weight(dense: Tensor, removed: Tensor, values: Tensor | None = None) -> Tensor:
    """`dense` [out, in] with the `removed` (bool [out, in]) weights zeroed and the others replaced by
    `values` [kept] (row-major) when given."""
    removed = removed.to(dense.device)
    weight = torch.zeros_like(dense)
    kept = ~removed
    weight[kept] = dense[kept] if values is None else values.to(dense.device, dense.dtype)
    return weight


def is_n_m(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of `m` consecutive inputs of every row holds at most `n` nonzeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(dim=1) <= n).all())
