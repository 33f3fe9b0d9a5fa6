"""Depth pruning of a trained model: whole blocks are skipped (the residual passes through).

Per stage, a block's redundancy is 1 − cos(block input, block output), averaged over tokens and
calibration samples; the most identity-like blocks (highest cosine) go first. This is pruning of a
trained denoiser, not the LayerDrop training regulariser. Blocks with several residual streams
(FLUX: image and text, returned as a tuple) count every token of every stream
(`adapter.block_streams`): a skipped block passes all of them through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Pruner, order_by_score


class DepthPruner(Pruner):
    """Removes whole blocks, most identity-like first."""

    name = "depth"
    depth = True

    def __init__(self, stat_dtype: str = "float64") -> None:
        """
        Args:
            stat_dtype: dtype of the accumulated cosines.
        """
        super().__init__(stat_dtype=stat_dtype)
        self.save_hyperparameters()

    def _register_block_hooks(self) -> None:
        n = len(self.adapter.blocks())
        self._cos = torch.zeros(n, device=self.device, dtype=self.stat_dtype)
        self._tokens = torch.zeros(n, device=self.device, dtype=self.stat_dtype)

        def hook(index):
            def fn(_module, args, kwargs, output):
                for x, y in self.adapter.block_streams(args, kwargs, output):  # [B, N, D] in and out
                    cos = F.cosine_similarity(x.to(self.stat_dtype), y.to(self.stat_dtype), dim=-1)  # [B, N]
                    self._cos[index] += cos.sum()
                    self._tokens[index] += cos.numel()
            return fn

        for i in range(n):
            self._handles.append(self.adapter.dense_block(i).register_forward_hook(hook(i), with_kwargs=True))

    def on_predict_epoch_end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cos = self._all_reduce(self._cos)
        self._tokens = self._all_reduce(self._tokens)
        super().on_predict_epoch_end()

    def block_order(self) -> Tensor:
        mean_cos = self._cos / self._tokens.clamp_min(1)
        return order_by_score(1 - mean_cos)  # redundancy 1 − cos, lowest first
