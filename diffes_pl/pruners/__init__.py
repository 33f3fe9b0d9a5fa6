"""Pruners: LightningModules whose `predict_step` gathers statistics; one stage per predict epoch."""
from . import obs
from .base import Pruner
from .store_build import build_store
from .depth import DepthPruner
from .obs import OBSPruner, prune_groups
from .scores import ActivationPruner, MagnitudePruner, WandaPruner

PRUNERS = {p.name: p for p in (OBSPruner, WandaPruner, MagnitudePruner, ActivationPruner, DepthPruner)}

__all__ = ["ActivationPruner", "DepthPruner", "MagnitudePruner", "OBSPruner", "PRUNERS", "Pruner",
           "WandaPruner", "build_store", "obs", "prune_groups"]
