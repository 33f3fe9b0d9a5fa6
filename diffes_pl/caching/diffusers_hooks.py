"""diffusers' own cache hooks (First Block Cache, Pyramid Attention Broadcast, FasterCache,
TaylorSeer, MagCache) as routed baselines: applied with diffusers' `apply_*` functions on the
denoiser, driven by the router's step source, removed by hook name.

`DiffusersCache` is a step listener (list it after the router): at every step it sets diffusers'
`CacheContext` (one name: the CFG halves run in one batched call, as in diffusers' own pipelines,
so threshold-based hooks decide once for the batch), resets the hooks' state at the first step of
a run and of every stage (each stage has its own pruned weights: their features are not reused;
the refresh rule of `refresh.py`), and
tells timestep-driven hooks (PAB, FasterCache) the current timestep when `timesteps` is given.

diffusers' hooks live on module OBJECTS (blocks, attentions). Width routing keeps the block
objects (First Block Cache, TaylorSeer and MagCache on blocks compose with it); depth routing
swaps blocks and width routing swaps attentions, so a hooked module the router replaced is refused
at the stage boundary (`CacheError`) rather than silently run uncached — use `BlockCache` there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


from ..denoisers.base import DenoiserAdapter
from .cache import CacheError
from .refresh import RefreshRule


def _hooks() -> dict[type, tuple[Any, tuple[str, ...]]]:
    """config class → (its apply function, the hook names it registers)."""
    from diffusers import hooks as h
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {
        h.FirstBlockCacheConfig: (h.apply_first_block_cache, (first_block_cache._FBC_LEADER_BLOCK_HOOK,
                                                              first_block_cache._FBC_BLOCK_HOOK)),
        h.PyramidAttentionBroadcastConfig: (h.apply_pyramid_attention_broadcast,
                                            (pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK,)),
        h.FasterCacheConfig: (h.apply_faster_cache, (faster_cache._FASTER_CACHE_DENOISER_HOOK,
                                                     faster_cache._FASTER_CACHE_BLOCK_HOOK)),
        h.TaylorSeerCacheConfig: (h.apply_taylorseer_cache, (taylorseer_cache._TAYLORSEER_CACHE_HOOK,)),
        h.MagCacheConfig: (h.apply_mag_cache, (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK)),
    }


class DiffusersCache:
    """A diffusers cache config applied to `adapter.denoiser` as a routed step listener (module docstring)."""

    def __init__(self, adapter: DenoiserAdapter, config: Any, levels: Sequence[int] | None = None,
                 timesteps: Sequence[float] | None = None) -> None:
        """
        Args:
            adapter: the denoiser.
            config: a diffusers cache config (`FirstBlockCacheConfig(threshold=…)`, …). A
                `current_timestep_callback` left None is set to this cache's `timestep`.
            levels: the schedule's level per stage when routing (checked against the router's).
            timesteps: the sampling timesteps (the partition's), for timestep-driven hooks.
        """
        from diffusers.hooks import HookRegistry

        known = _hooks()
        if type(config) not in known:
            raise ValueError(f"{type(config).__name__} is not one of diffusers' cache configs offered here: "
                             f"{', '.join(c.__name__ for c in known)}")
        self.adapter, self.config = adapter, config
        self.rule = RefreshRule(1, levels)  # only its stage/level bookkeeping: the hooks decide what is cached
        self.timesteps = None if timesteps is None else [float(t) for t in timesteps]
        self._step: int | None = None
        if any(f.name == "current_timestep_callback" for f in dataclasses.fields(config)) \
                and config.current_timestep_callback is None:
            config.current_timestep_callback = self.timestep
        root = adapter.denoiser
        before = {id(m) for m in root.modules() if getattr(m, "_diffusers_hook", None) is not None}
        self._own_forward = {id(m) for m in root.modules() if "forward" in m.__dict__}
        apply, self._names = known[type(config)]
        try:
            apply(root, config)
        except (IndexError, KeyError, ValueError) as err:  # diffusers' own words for "no blocks I know"
            raise ValueError(f"{type(config).__name__} found nothing to hook in {type(root).__name__} "
                             f"({adapter.name}): diffusers says {err!r}") from err
        self._registry = HookRegistry.check_if_exists_or_initialize(root)
        self._registry.invalidate_child_registries_cache()
        registries = [(m, getattr(m, "_diffusers_hook", None)) for m in root.modules()]
        self._created = [m for m, r in registries if r is not None and id(m) not in before]
        self._hooked = [m for m, r in registries if r is not None and any(n in r.hooks for n in self._names)]
        if not self._hooked:
            raise ValueError(f"{type(config).__name__} found nothing to hook in {type(root).__name__} "
                             f"({adapter.name}); diffusers does not support this denoiser for it")

    @property
    def levels(self) -> tuple[int, ...] | None:
        return self.rule.levels

    def timestep(self) -> float:
        """The timestep of the current step (for `current_timestep_callback`)."""
        if self.timesteps is None or self._step is None:
            raise CacheError(f"{type(self.config).__name__} reads the current timestep: build DiffusersCache "
                             f"with timesteps=partition.timesteps")
        return self.timesteps[self._step]

    def _check_installed(self) -> None:
        present = {id(m) for m in self.adapter.denoiser.modules()}
        missing = [m for m in self._hooked if id(m) not in present]
        if missing:
            raise CacheError(f"the router replaced {len(missing)} module(s) carrying diffusers' "
                             f"{type(self.config).__name__} hooks (a {type(missing[0]).__name__}): those hooks "
                             f"live on the dense modules; use caching.BlockCache with this schedule")

    def on_step(self, step: int, stage: int) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        new_run = self.rule.new_run(step)
        previous = None if new_run else self.rule.stage
        self.rule.step(step, stage)
        if new_run or stage != previous:
            self._registry.reset_stateful_hooks()
            self._check_installed()
        self._step = step
        steps = None if self.timesteps is None else len(self.timesteps)
        _set_cache_context(self.adapter.denoiser, CacheContext("batch", step_index=step, num_inference_steps=steps))

    def clear(self) -> None:
        """Drops the hooks' state (the end of a sampling run)."""
        from diffusers.hooks.hooks import _set_cache_context

        self._registry.reset_stateful_hooks()
        _set_cache_context(self.adapter.denoiser, None)
        self.rule.reset()
        self._step = None

    def remove(self) -> None:
        """Removes the hooks (and the empty registries they created): the denoiser runs as before."""
        self.clear()
        for name in self._names:
            self._registry.remove_hook(name, recurse=True)
        for module in self._created:
            if not module._diffusers_hook.hooks:
                del module._diffusers_hook
        for module in self._hooked:  # diffusers leaves the bound class forward as an instance attribute
            if id(module) not in self._own_forward and getattr(module, "_diffusers_hook", None) is None:
                module.__dict__.pop("forward", None)
        self._hooked, self._created = [], []

    def __enter__(self) -> "DiffusersCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
