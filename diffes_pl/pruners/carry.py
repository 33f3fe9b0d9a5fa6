"""Block-by-block calibration with carried activations, and streamed weights.

On a denoiser whose blocks run one after another (`adapter.carries_blocks`: every transformer family),
a stage is calibrated block by block without running the blocks before the current one again:

1. the stage's calibration batches are embedded once: a pre-hook on the first block records each
   batch's call — the residual streams named by `adapter.block_io` and what every block shares (the
   timestep embedding, rotary embeddings, text, masks) — on the host, and ends the forward;
2. block b runs on every recorded call with its unit groups' statistics hooks on; its outputs replace
   the streams of the call for block b + 1. The denoiser stays dense during calibration (OBS-Diff's
   sequential groups excepted: `Pruner._carry_stage`), so these are the inputs the whole-model
   forward would give block b + 1: the same operations on the same tensors, hence the same
   statistics and store, bit for bit (tests/pruners/test_block_calibration.py).

Only one block's statistics exist at a time, and each batch runs each block once (the whole-model
forward count, not the re-run prefixes of `calibrate_by: block` on a UNet, whose transformer blocks sit
between resnets and skip connections). The carried calls live on the host; one batch's call is on the
accelerator while its block runs.

Streamed weights: the blocks stay on the host and each goes to the accelerator for its own turn (the
embedding layers and output head, a few percent of the weights, stay there): a model calibrates on an
accelerator smaller than its weights. A block is called directly here, so moving it is one `.to`;
accelerate's offload hooks serve forwards that run the whole model, which this does not.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

Call = tuple[tuple, dict]  # one block call: (positional arguments, keyword arguments)


class PartDone(Exception):
    """Ends a calibration forward early: every block the pass needs has run (`base.stop_after`), or
    the first block's call is recorded (`CarriedCalls.capture`)."""


def _to(device: torch.device | str) -> Any:
    return lambda x: x.to(device) if isinstance(x, Tensor) else x


def call_bytes(call: Call) -> int:
    """Bytes of the tensors in one recorded call."""
    total = [0]

    def add(x: Any) -> Any:
        if isinstance(x, Tensor):
            total[0] += x.numel() * x.element_size()
        return x

    tree_map(add, call)
    return total[0]


class CarriedCalls:
    """The calls of the current block for every calibration batch of this process, on the host."""

    def __init__(self, block_io: tuple[tuple[str, int, int | None], ...], host: str = "cpu") -> None:
        """`host`: where the calls are kept (the memory plan records them on the meta device)."""
        self.io, self.host = block_io, host
        self.calls: list[Call] = []

    def capture(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with_kwargs) on the first block to visit: records the call, ends the forward."""
        self.calls.append(tree_map(_to(self.host), (args, kwargs)))
        raise PartDone()

    @property
    def nbytes(self) -> int:
        return sum(call_bytes(c) for c in self.calls)

    def run(self, block: nn.Module, device: torch.device, advance: bool,
            before: Callable[[int], None] | None = None) -> None:
        """Runs `block` on every call (on `device`); with `advance`, each call becomes the next block's.
        `before(i)` runs before call i (the pruner restores what its statistics need of that batch)."""
        for i, call in enumerate(self.calls):
            if before is not None:
                before(i)
            args, kwargs = tree_map(_to(device), call)
            output = block(*args, **kwargs)
            if advance:
                self.calls[i] = tree_map(_to(self.host), self.next_call(args, kwargs, output))

    def next_call(self, args: tuple, kwargs: dict, output: Any) -> Call:
        """The next block's call: this call with its streams replaced by the block's outputs."""
        args, kwargs = list(args), dict(kwargs)
        for name, position, index in self.io:
            stream = output if index is None else output[index]
            if name in kwargs:
                kwargs[name] = stream
            else:
                args[position] = stream
        return tuple(args), kwargs


def place_outside(denoiser: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str) -> None:
    """Moves every weight of `denoiser` to `device` except those inside `blocks` (which stay where they are)."""
    inside = {id(b) for b in blocks}

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                visit(child)
            else:
                child.to(device)
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))

    visit(denoiser)


__all__ = ["CarriedCalls", "PartDone", "call_bytes", "place_outside"]
