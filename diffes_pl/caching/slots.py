"""Reversible module swaps for feature caching, in the router's style: a `CachedSlot` stands in a
slot (a block list entry, a UNet's `mid_block`) for WHATEVER module is installed there — the dense
block, or the block the router installed for the current stage — and asks its cache what to do with
each call: run the module, record around it, or skip it. The wrapped module is called through its
own `__call__`, so its hooks (masks, statistics) stay inside; nothing edits a model's forward.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import nn


class SlotOwner(Protocol):
    """What a `CachedSlot` asks of its cache (a `cache.FeatureCache`): what to do with one call."""

    def call(self, role: Any, inner: nn.Module, args: tuple, kwargs: dict) -> Any: ...


class ModuleSlot:
    """One writable place holding a module: `holder[key]` (an nn.ModuleList, the adapter's
    `BlockSlots`) for an integer key, `holder.key` (an attribute) for a string key."""

    def __init__(self, holder: Any, key: int | str) -> None:
        self.holder, self.key = holder, key

    def get(self) -> nn.Module:
        return self.holder[self.key] if isinstance(self.key, int) else getattr(self.holder, self.key)

    def set(self, module: nn.Module) -> None:
        if isinstance(self.key, int):
            self.holder[self.key] = module
        else:
            setattr(self.holder, self.key, module)


class CachedSlot(nn.Module):
    """Stands in a slot for `inner`; every call goes to `cache.call(role, inner, args, kwargs)`.
    Attributes it lacks are read from `inner` (DiT reads `transformer_blocks[0].norm1`, the UNet
    `up_block.resnets`), so the denoiser's forward sees the module it expects."""

    def __init__(self, inner: nn.Module, cache: SlotOwner, role: Any) -> None:
        super().__init__()
        self.inner = inner
        self.__dict__["cache"] = cache  # not a submodule: the cache owns no parameters
        self.role = role

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache.call(self.role, self.inner, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)
