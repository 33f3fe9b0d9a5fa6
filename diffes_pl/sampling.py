"""Scheduled sampling: diffusers schedulers driven step by step, with classifier-free guidance and a
step source that tells listeners (the router, progress displays) the current step and stage.

The stage is known from the sampling loop's own counter — never read back from a tensor — so a
listener can swap weights at a stage boundary without a host sync.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from .denoisers.base import DenoiserAdapter
from .memory import available_bytes
from .partition import StagePartition


class StepListener(Protocol):
    """Told, before every denoiser call, which sampling step and stage is about to run."""

    def on_step(self, step: int, stage: int) -> None: ...


def seeded_noise(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial noise [N, C, H, W] from a CPU generator: the same for a seed on every device and batch size.

    Drawn by diffusers' `randn_tensor` (what its pipelines draw latents with), in float32 on the CPU
    and cast after, so that the numbers do not depend on the requested dtype."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(tuple(shape), generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                         dtype=torch.float32)
    return noise.to(dtype)


def step_generators(noise_seeds: Sequence[int], step: int) -> list[torch.Generator]:
    """One CPU generator per sample for a stochastic sampler's noise at `step` (Euler ancestral),
    seeded by (the sample's seed, step): the noise is a pure function of sample and step, so it does
    not depend on the batch size, nor on where a rollout starts (resumed mid-trajectory)."""
    return [torch.Generator().manual_seed(int(s) * 1_000_003 + step) for s in noise_seeds]


def as_conditions(adapter: DenoiserAdapter, conditions: Any) -> Any:
    """Class labels as a LongTensor; prompt strings encoded by a text-conditioned adapter's text
    encoders; other condition types (a `TextCondition`) pass through."""
    if isinstance(conditions, (list, tuple)) and all(isinstance(c, int) for c in conditions):
        conditions = torch.tensor(conditions, dtype=torch.long)
    elif isinstance(conditions, (list, tuple)) and conditions and all(isinstance(c, str) for c in conditions):
        if adapter.conditioning != "text":
            raise ValueError(f"{adapter.name} is class-conditional: pass class labels, not prompts")
        conditions = adapter.encode_prompts(list(conditions))
    adapter.validate_condition(conditions)
    return conditions


def guided_noise(adapter: DenoiserAdapter, latents: Tensor, t: Tensor, cond: Any, null: Any, guidance: float) -> Tensor:
    """ε with classifier-free guidance: ε_u + g·(ε_c − ε_u); one batched call for both halves."""
    batch = latents.shape[0]
    if guidance == 1.0:
        return adapter.predict_noise(latents, t.expand(batch), cond)
    eps = adapter.predict_noise(torch.cat([latents, latents]), t.expand(2 * batch),
                                adapter.concat_conditions(cond, null))  # [2B, C, H, W]
    eps_c, eps_u = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def probe_rows_that_fit(adapter, guidance: float, share: float = 0.8, trial: int = 2) -> int | None:
    """Probe rows (one latent each; CFG doubles them inside the step) one denoiser call can take in
    `share` of the GPU memory free now, from the peak memory of a `trial`-row step; None on a CPU
    (one call takes every row: memory there is the machine's, and batching gains little)."""
    device = adapter.device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros(trial, *adapter.latent_shape, device=device, dtype=adapter.dtype)
    cond = adapter.example_condition(trial, device)
    guided_noise(adapter, x, torch.full((1,), 500.0, device=device), cond, adapter.null_condition(cond), guidance)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - before) / trial)
    return max(1, int(share * available_bytes(device) / per_row))


@torch.no_grad()
def rollout(adapter: DenoiserAdapter, scheduler: Any, latents: Tensor, cond: Any, *, guidance: float,
            partition: StagePartition, steps: Iterable[int] | None = None,
            listeners: Sequence[StepListener] = (), noise_seeds: Sequence[int] | None = None,
            on_latents: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Runs sampling steps `steps` (default: all) from `latents` [B, C, H, W]; returns the latents
    after the last one. `scheduler.set_timesteps` must already have been called. `on_latents(step,
    x)` receives the latents entering each step (for caching intermediate states). `noise_seeds`
    (one per sample) seed a stochastic sampler's per-step noise (see `step_generators`)."""
    null = adapter.null_condition(cond)
    timesteps = scheduler.timesteps
    step_to_stage = partition.step_to_stage
    for step in (range(len(timesteps)) if steps is None else steps):
        stage = step_to_stage[step]
        for listener in listeners:
            listener.on_step(step, stage)
        if on_latents is not None:
            on_latents(step, latents)
        t = timesteps[step].to(latents.device)
        scale = getattr(scheduler, "scale_model_input", None)  # flow matching has none
        model_in = latents if scale is None else scale(latents, t)
        eps = guided_noise(adapter, model_in, t.reshape(1), cond, null, guidance)
        kwargs = {"generator": step_generators(noise_seeds, step)} if noise_seeds is not None else {}
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return latents


def prepare_scheduler(adapter: DenoiserAdapter, sampler: str, steps: int) -> Any:
    scheduler = adapter.make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample(adapter: DenoiserAdapter, conditions: Any, steps: int = 20, guidance: float = 2.1, seed: int = 0,
           router: Any = None, sampler: str = "ddim", num_stages: int | None = None,
           listeners: Sequence[StepListener] = (), noise: Tensor | None = None, batch_size: int | None = None,
           output: str = "images", cache: Any = None) -> Tensor:
    """Samples one image per condition. Returns images [N, C, H, W] in [0, 1] (or latents).

    Args:
        adapter: the denoiser's adapter.
        conditions: class labels (list or LongTensor [N]) or the family's condition object.
        steps: sampling steps. guidance: CFG scale (1 = no guidance). seed: seeds the initial noise.
        router: a `Router` installing a schedule (None: the dense denoiser). Its partition must
            match this sampler and step count.
        sampler: `ddim` (default), `dpm` (DPM-Solver++ 2M) or `euler_a`.
        num_stages: for listeners when no router is given (default 1).
        noise: explicit initial noise [N, C, H, W] instead of `seed`.
        batch_size: split the N conditions into batches of this size (same result).
        output: `images` or `latents`.
        cache: a feature cache (`caching.feature_cache`), told each step after the listeners; built
            with the router's `schedule.levels` when routing. Cleared at the end of the run.
    """
    cond = as_conditions(adapter, conditions)
    n = len(cond)
    if n == 0:
        raise ValueError("no conditions given: pass at least one class label or prompt")
    device, dtype = adapter.device, adapter.dtype
    if noise is None:
        noise = seeded_noise((n, *adapter.latent_shape), seed, dtype)
    scheduler = prepare_scheduler(adapter, sampler, steps)
    if router is not None:
        partition = router.partition
        expected = [float(t) for t in scheduler.timesteps]
        if list(partition.timesteps) != expected:
            raise ValueError(
                f"the router's schedule was made for timesteps {list(partition.timesteps)[:4]}… "
                f"({partition.num_steps} steps) but this sampler ({sampler}, {steps} steps) runs "
                f"{expected[:4]}…; sample with the settings the schedule was searched with")
        if cache is not None and cache.levels != tuple(router.schedule.levels):
            raise ValueError(f"the cache was built for levels {cache.levels} but the router installs "
                             f"{tuple(router.schedule.levels)}: build it with levels=router.schedule.levels, so "
                             f"that a level change refreshes it")
        listeners = [router, *listeners]
    else:
        partition = StagePartition(tuple(float(t) for t in scheduler.timesteps), num_stages or 1,
                                   int(scheduler.config.num_train_timesteps))
    if cache is not None:  # last: it wraps whatever the router (or a masking listener) installed
        listeners = [*listeners, cache]
    batch_size = batch_size or n
    # a stochastic sampler (Euler ancestral) draws noise every step: per-sample seeds keep it
    # independent of batch_size
    noise_seeds = [seed * 65_537 + i for i in range(n)] if adapter.sampler(sampler).stochastic else None
    outs = []
    try:
        for start in range(0, n, batch_size):
            latents = noise[start:start + batch_size].to(device=device, dtype=dtype)
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
            c = cond[start:start + batch_size]
            c = c.to(device) if hasattr(c, "to") else c  # tensors and condition objects (TextCondition)
            scheduler = prepare_scheduler(adapter, sampler, steps)  # fresh multistep state per batch
            latents = rollout(adapter, scheduler, latents, c, guidance=guidance, partition=partition,
                              listeners=listeners,
                              noise_seeds=None if noise_seeds is None else noise_seeds[start:start + batch_size])
            outs.append(latents if output == "latents" else adapter.decode(latents))
    finally:
        if cache is not None:
            cache.clear()
        if router is not None:
            router.restore_dense()
    return torch.cat(outs)
