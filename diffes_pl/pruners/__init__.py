"""Pruners: LightningModules whose `predict_step` gathers statistics; one stage per predict epoch."""
from . import obs
from .base import Pruner
from .store_build import build_store
from .depth import DepthPruner
from .obs import OBSPruner, prune_groups
from .scores import ActivationPruner, MagnitudePruner, WandaPruner
from .sparse import SparseMagnitudePruner, SparseOBSPruner, SparseWandaPruner

PRUNERS = {p.name: p for p in (OBSPruner, WandaPruner, MagnitudePruner, ActivationPruner, DepthPruner,
                               SparseOBSPruner, SparseWandaPruner, SparseMagnitudePruner)}

__all__ = ["ActivationPruner", "DepthPruner", "MagnitudePruner", "OBSPruner", "PRUNERS", "Pruner",
           "SparseMagnitudePruner", "SparseOBSPruner", "SparseWandaPruner", "WandaPruner", "build_store", "obs",
           "prune_groups"]
