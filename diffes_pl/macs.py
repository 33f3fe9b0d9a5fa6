"""Multiply-accumulates of one denoiser forward, counted by torch's own `FlopCounterMode`.

Every matmul, convolution and attention product is counted (FLOPs / 2), on whatever modules are
installed — dense, sliced or routed — and on the meta device, so DiT-XL/2 needs no weights and no
memory. These are dense-equivalent MACs: a zero weight costs what any other weight costs, as it does
in a dense kernel. `count_kernel_macs` also counts what a semi-structured N:M kernel (2:4 on sparse
tensor cores) executes on the layers whose weights hold the pattern. Convention: one forward at the given batch size; the CFG duplicate is NOT included (the
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


@torch.no_grad()
def count_kernel_macs(adapter: DenoiserAdapter, batch_size: int = 1, n: int = 2, m: int = 4) -> tuple[int, int]:
    """(dense-equivalent MACs, MACs an n:m semi-structured kernel executes) of one forward: every
    `nn.Linear` whose weight holds at most `n` nonzeros in each group of `m` consecutive inputs runs
    n/m of its MACs, everything else runs dense (unstructured sparsity gains nothing here)."""
    from .sparsity import is_n_m

    sparse = {layer: n / m for layer in adapter.denoiser.modules()
              if isinstance(layer, torch.nn.Linear) and layer.weight.device.type != "meta" and is_n_m(layer.weight, n, m)}
    saved = [0.0]

    def count(layer, args, out):
        saved[0] += (1 - sparse[layer]) * out.numel() * layer.in_features

    handles = [layer.register_forward_hook(count) for layer in sparse]
    try:
        dense = count_macs(adapter, batch_size)
    finally:
        for h in handles:
            h.remove()
    return dense, dense - round(saved[0])


def install_uniform_width(adapter: DenoiserAdapter, level: int, levels_max: int) -> None:
    """Installs level `level` of `levels_max` of width pruning in every unit group with the FIRST
    units kept, no store needed: a MAC count depends only on how many units each group keeps
    (round(L/H · n) removed), never on which, so this counts what any width-pruned stage at that
    level runs (also on the meta device). For MAC counting only (the weights are not compensated);
    `adapter.restore_dense()` undoes it."""
    for group in adapter.unit_groups():
        keep = keep_from_order(torch.arange(group.size), group.removed_at(level, levels_max))
        adapter.install(group, adapter.sliced_module(group, keep))


def schedule_kernel_macs(adapter: DenoiserAdapter, router, partition, n: int = 2, m: int = 4) -> int:
    """`schedule_macs` as an n:m semi-structured kernel executes it (`count_kernel_macs`)."""
    total = 0
    for stage in range(partition.num_stages):
        router.install(stage)
        total += count_kernel_macs(adapter, n=n, m=m)[1] * partition.steps_per_stage[stage]
    router.restore_dense()
    return total


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
