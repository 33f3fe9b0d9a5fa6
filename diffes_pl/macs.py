"""Multiply-accumulates of one denoiser forward, counted by torch's own `FlopCounterMode`.

Every matmul, convolution and attention product is counted (FLOPs / 2), on whatever modules are
installed — dense, sliced or routed — and on the meta device, so DiT-XL/2 needs no weights and no
memory. Convention: one forward at the given batch size; the CFG duplicate is NOT included (the
paper's convention: 20 steps at batch 1 = 20 forwards). Also here: a uniform width level installed
for counting (`install_uniform_width`) and the MACs of a whole routed sampling run (`schedule_macs`).
Below caching/ (the step cost tables) and evaluation/ (the report), which both count with it.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .denoisers.base import DenoiserAdapter, keep_from_order


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# On CPU, scaled_dot_product_attention dispatches to a kernel FlopCounterMode has no formula for
# (it would count 0): count it like the other SDPA kernels, QKᵀ + AV.
_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flop


@torch.no_grad()
def count_macs(adapter: DenoiserAdapter, batch_size: int = 1, timestep: float = 500.0) -> int:
    """MACs of one `adapter.denoiser` forward on a batch of `batch_size` latents."""
    device = adapter.device
    latents = torch.zeros((batch_size, *adapter.latent_shape), device=device, dtype=adapter.dtype)
    t = torch.full((batch_size,), timestep, device=device)
    cond = adapter.example_condition(batch_size, device)
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        adapter.predict_noise(latents, t, cond)
    return counter.get_total_flops() // 2


def install_uniform_width(adapter: DenoiserAdapter, level: int, levels_max: int) -> None:
    """Installs level `level` of `levels_max` of width pruning in every unit group with the FIRST
    units kept, no store needed: a MAC count depends only on how many units each group keeps
    (round(L/H · n) removed), never on which, so this counts what any width-pruned stage at that
    level runs (also on the meta device). For MAC counting only (the weights are not compensated);
    `adapter.restore_dense()` undoes it."""
    for group in adapter.unit_groups():
        keep = keep_from_order(torch.arange(group.size), group.removed_at(level, levels_max))
        adapter.install(group, adapter.sliced_module(group, keep))


def schedule_macs(adapter: DenoiserAdapter, router, partition) -> int:
    """MACs of a whole sampling run at batch 1 (one forward per step, the CFG duplicate not counted):
    the dense denoiser's for `router=None`, else each stage's routed denoiser times its steps."""
    if router is None:
        return count_macs(adapter) * partition.num_steps
    total = 0
    for stage in range(partition.num_stages):
        router.install(stage)
        total += count_macs(adapter) * partition.steps_per_stage[stage]
    router.restore_dense()
    return total
