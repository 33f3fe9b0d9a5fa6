"""The adapter protocol: what diffes-pl needs to know about one denoiser family.

An adapter lists the prunable **unit groups** (the heads of each attention module, the channels of
each feed-forward) and the blocks, and builds physically smaller replacements for them. A
replacement is a module that takes the place of a block's attribute (`block.attn1`, `block.ff`, or
the block itself) — installing one is a single reference swap, which is what routing relies on.
The dense modules are never modified: replacements are shallow copies that share every parameter
they do not slice.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..schedule import units_removed
from .samplers import Sampler, find_sampler, is_flow_matching


@dataclass(frozen=True)
class UnitGroup:
    """One group of prunable units: the heads of one attention module or the channels of one MLP.

    `attr` is the block attribute holding the module (`attn1`, `attn2`, `ff`); `unit_width` is the
    number of input columns of the output-side layer that one unit owns (head_dim, or 1 for a channel).
    """

    name: str
    kind: str  # "heads" | "channels"
    block: int
    attr: str
    size: int
    unit_width: int

    def removed_at(self, level: int, levels_max: int) -> int:
        """Units removed at `level` of `levels_max`: round(level / H · n)."""
        return units_removed(level, levels_max, self.size)

    def columns(self, units: Tensor) -> Tensor:
        """Input columns of the output-side layer owned by `units` [k] → [k · unit_width]."""
        units = torch.as_tensor(units, dtype=torch.long)
        offsets = torch.arange(self.unit_width)
        return (units[:, None] * self.unit_width + offsets[None, :]).reshape(-1)


@dataclass(frozen=True)
class SparseLayer:
    """Linear layers inside one unit group's module that read the same input (a self-attention's q,
    k and v): one statistic (Hessian, column norms) serves them all, and each is pruned to its own
    mask (unstructured / N:M sparsity). `paths`: dotted paths inside the group's module; a layer's
    name in a store is `<group>.<path>`."""

    group: str
    block: int
    paths: tuple[str, ...]
    in_features: int

    @property
    def key(self) -> str:
        """The statistic's name: the first layer's."""
        return f"{self.group}.{self.paths[0]}"

    def names(self) -> list[str]:
        return [f"{self.group}.{p}" for p in self.paths]


# Linear layers of a diffusers Attention that read one tensor: q/k/v the hidden states (k/v only, the
# text, in a cross-attention), the joint attention's add_*_proj the text stream
_SHARED_INPUTS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))


def shared_inputs(module: nn.Module, paths: list[str]) -> list[tuple[str, ...]]:
    """`paths` (linear layers of `module`) grouped by the input they read, in `paths`' order."""
    cross = bool(getattr(module, "is_cross_attention", False))
    sets = []
    for names in _SHARED_INPUTS:
        present = tuple(n for n in (names[1:] if cross and names[0] == "to_q" else names) if n in paths)
        if len(present) > 1:
            sets.append(present)
    taken = {p for s in sets for p in s}
    return sorted(sets + [(p,) for p in paths if p not in taken], key=lambda s: paths.index(s[0]))


def with_weight(layer: nn.Linear, weight: Tensor) -> nn.Linear:
    """A new `nn.Linear` of `layer`'s shape holding `weight` [out, in]; the bias is shared."""
    if weight.shape != layer.weight.shape:
        raise ValueError(f"replacement weight has shape {tuple(weight.shape)}, expected {tuple(layer.weight.shape)}")
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if layer.bias is not None:
        new.bias = layer.bias
    return new


class ConstantOutput(nn.Module):
    """Stands in for an attention or feed-forward whose units are all removed: it returns the
    output projection's bias (what the masked dense module returns when every input column is zero)."""

    def __init__(self, bias: Tensor | None, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.bias = bias  # shared with the dense module, not a copy

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        shape = (*hidden_states.shape[:-1], self.out_features)
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.to(hidden_states.dtype).expand(shape)


def sliced_linear(layer: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None,
                  weight: Tensor | None = None) -> nn.Linear:
    """A new, physically smaller `nn.Linear` holding `layer`'s rows (outputs) and/or columns (inputs).

    `weight` replaces the sliced weight (compensated OBS weights); the bias follows the rows.
    """
    w = layer.weight
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    if weight is not None:
        if weight.shape != w.shape:
            raise ValueError(f"replacement weight has shape {tuple(weight.shape)}, expected {tuple(w.shape)}")
        w = weight.to(device=w.device, dtype=w.dtype)
    bias = layer.bias
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = bias if rows is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
    if weight is None and (rows is None) != (cols is None):
        # where the weight was gathered from: lets a Router refill it in place (Router(resident=False))
        new._gathered_from = (layer, 0 if rows is not None else 1, rows if rows is not None else cols)
    return new


def with_children(module: nn.Module, replacements: dict[str, nn.Module], **attrs: Any) -> nn.Module:
    """A shallow copy of `module` whose submodules at dotted paths are replaced and whose plain
    attributes are set from `attrs`. The original module is untouched; everything not replaced is
    shared by reference (no parameter is copied)."""
    if "forward" in module.__dict__:
        raise RuntimeError(
            f"{type(module).__name__} has an instance-level forward (a hook that rewrites forward); "
            "slicing would bypass it. Register such hooks on the denoiser, not on its attention/MLP modules."
        )
    new = copy.copy(module)
    new._modules = OrderedDict(module._modules)
    for key in list(vars(new)):
        if key.endswith("hooks") and isinstance(vars(new)[key], dict):
            setattr(new, key, OrderedDict())  # hooks on the dense module stay on the dense module
    nested: dict[str, dict[str, nn.Module]] = {}
    for path, child in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = child
        else:
            new._modules[head] = child
    for head, sub in nested.items():
        new._modules[head] = with_children(module._modules[head], sub)
    for key, value in attrs.items():
        setattr(new, key, value)
    return new


@dataclass(frozen=True)
class EvaluationReference:
    """Real data a family's samples are evaluated against by default (`diffes-pl test`, fitness
    comparisons on fresh probes), declared by its adapter so that evaluation never asks which family
    it holds."""

    images: str  # what `evaluation.features.real_features` reads: a named set (digits-test), a tensor file, a folder
    feature_network: str = "inception"  # FID / IS / precision-recall features: digits or inception
    metrics: tuple[str, ...] = ()  # metrics scored against the reference's classes (class_accuracy, digits_fid)


class DenoiserAdapter(ABC):
    """Knows one denoiser family: its prunable units, how to slice them, how to call it.

    Subclasses set `denoiser` (the nn.Module called once per sampling step), `name` (hub name,
    path or built-in name) and implement the abstract methods.
    """

    denoiser: nn.Module
    name: str
    family: str = "base"  # the registered family's name (`registry.family_of`); part of store keys

    # --- declarations: what callers read instead of probing the adapter ----------------------
    conditioning: str = "class"  # "class" (labels, `num_classes`) or "text" (prompts → TextCondition)
    samplers: tuple[Sampler, ...] = ()  # the first is the default
    noise_schedule: dict  # the training noise as a diffusers scheduler config (`samplers.py`)
    num_classes: int | None = None  # class-conditional families: classes without the null class
    vae: nn.Module | None = None  # None: pixel space
    latent_scale: float | None = None
    latent_shift: float | None = None  # subtracted before scaling (FLUX); None: no shift
    text_len: int | None = None  # tokens of the encoder padded to the adapter's length (FLUX's T5)
    has_text_encoders: bool = False
    # what its samples are evaluated against when the user names nothing else (None: the user must)
    evaluation_reference: EvaluationReference | None = None

    @property
    def pipeline_class(self) -> str | None:
        """The diffusers pipeline an export is written as (None: not exportable), from the family record."""
        record = self._record()
        return None if record is None else record.pipeline_class

    @property
    def denoiser_subfolder(self) -> str:
        record = self._record()
        return "transformer" if record is None else record.denoiser_subfolder

    def _record(self):
        from .registry import families

        return families().get(self.family)

    @property
    def prediction_type(self) -> str:
        """What `predict_noise` returns, in diffusers' words: "epsilon", "v_prediction", or for
        rectified flow "flow_prediction" (the velocity; FlowMatchEulerDiscreteScheduler implies it)."""
        if is_flow_matching(self.noise_schedule):
            return "flow_prediction"
        return self.noise_schedule.get("prediction_type", "epsilon")

    def sampler(self, name: str | None = None) -> Sampler:
        """The declared sampler called `name` (an alias works too); None: the default (the first)."""
        if name is None:
            return self.samplers[0]
        return find_sampler(self.samplers, name, self.family)

    def make_scheduler(self, kind: str | None = None) -> Any:
        """A diffusers scheduler of sampler `kind` (default: the adapter's default sampler) configured
        with this denoiser's training noise schedule."""
        return self.sampler(kind).make_scheduler(self.noise_schedule)

    def validate_condition(self, cond: Any) -> None:
        """Refuses (TypeError / ValueError) a condition this denoiser cannot take."""

    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 16) -> "TextCondition":
        """Prompts → TextCondition, for text-conditioned families (`text.TextConditioned`)."""
        raise ValueError(f"{self.name} is class-conditional: pass class labels, not prompts")

    def text_identity(self) -> list | None:
        """What identifies the text encoders in a cache key (None: none)."""
        return None

    # --- structure -------------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The denoiser's prunable blocks (depth units), in forward order."""

    @abstractmethod
    def unit_groups(self) -> list[UnitGroup]:
        """Every group of prunable units (heads of each attention, channels of each MLP)."""

    @abstractmethod
    def output_layer(self, group: UnitGroup, module: nn.Module | None = None) -> nn.Linear:
        """The output-side linear layer whose INPUT columns are the group's units (statistics and
        OBS compensation live here). `module` defaults to the dense module."""

    @abstractmethod
    def sliced_module(self, group: UnitGroup, keep: Tensor, out_weight: Tensor | None = None) -> nn.Module:
        """A physically smaller replacement for the group's module keeping units `keep` (sorted);
        `out_weight` [out, len(keep) · unit_width] replaces the output layer's kept columns."""

    def sparse_layers(self) -> list[SparseLayer]:
        """The layers unstructured and N:M sparsity prune: every linear layer inside the unit groups'
        modules, those reading one input together (`shared_inputs`). Norms, embeddings and the adaLN
        modulation lie outside the groups and stay dense."""
        layers = []
        for group in self.unit_groups():
            module = self.dense_module(group)
            linears = {n: m for n, m in module.named_modules() if n and isinstance(m, nn.Linear)}
            for paths in shared_inputs(module, list(linears)):
                layers.append(SparseLayer(group.name, group.block, paths, linears[paths[0]].in_features))
        return layers

    def sparse_linears(self) -> dict[str, nn.Linear]:
        """{store name `<group>.<path>`: the dense linear layer} of every sparse layer."""
        modules = {g.name: self.dense_module(g) for g in self.unit_groups()}
        return {f"{layer.group}.{path}": modules[layer.group].get_submodule(path)
                for layer in self.sparse_layers() for path in layer.paths}

    def sparse_module(self, group: UnitGroup, weights: dict[str, Tensor]) -> nn.Module:
        """The group's module with the linear layers at `weights`' paths holding those [out, in]
        weights (a shallow copy: everything else, biases included, shared with the dense module)."""
        dense = self.dense_module(group)
        return with_children(dense, {path: with_weight(dense.get_submodule(path), w) for path, w in weights.items()})

    @abstractmethod
    def skipped_block(self, index: int) -> nn.Module:
        """A replacement for block `index` that passes the residual stream through unchanged."""

    # --- calling the denoiser ----------------------------------------------------------------
    def denoiser_timestep(self, t: float) -> float:
        """The `timestep` argument the denoiser receives at the sampler's timestep `t` (in its
        family's pipeline and in `predict_noise`); the step-source hook keys on it."""
        return float(t)

    @abstractmethod
    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        """ε-prediction (or flow velocity) [B, C, H, W] for latents [B, C, H, W] at timesteps [B]."""

    @abstractmethod
    def null_condition(self, cond: Any) -> Any:
        """The unconditional counterpart of `cond` (for classifier-free guidance)."""

    @abstractmethod
    def concat_conditions(self, a: Any, b: Any) -> Any:
        """Conditions of two batches stacked along the batch axis."""

    @abstractmethod
    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> Any:
        """A valid condition for `batch_size` samples (for MAC counting and smoke runs)."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent (or pixel image for pixel-space denoisers)."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images [N, C, H, W] in [0, 1]. Pixel-space default: [-1, 1] → [0, 1]."""
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def identity(self) -> dict:
        """What identifies this denoiser in a store key: name, class and architecture config."""
        from ..trajectory import canonical  # tuples → lists: the form a store manifest holds

        config = dict(getattr(self.denoiser, "config", {}))
        return {"name": self.name, "family": self.family, "class": type(self.denoiser).__name__,
                "config": canonical({k: v for k, v in sorted(config.items()) if not k.startswith("_")})}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # --- installing replacements -------------------------------------------------------------
    def capture_dense(self) -> None:
        """Remembers the dense modules (subclasses call this at the end of __init__): slicing always
        starts from them, and `restore_dense` puts them back bit for bit."""
        self._dense_blocks = list(self.blocks())
        self._dense_modules = {g.name: getattr(self._dense_blocks[g.block], g.attr) for g in self.unit_groups()}

    def dense_module(self, group: UnitGroup) -> nn.Module:
        return self._dense_modules[group.name]

    def dense_block(self, index: int) -> nn.Module:
        return self._dense_blocks[index]

    def restore_dense(self) -> None:
        """Reinstalls every dense module and block (undoes any routing or slicing)."""
        for i, block in enumerate(self._dense_blocks):
            self.blocks()[i] = block
        for g in self.unit_groups():
            setattr(self._dense_blocks[g.block], g.attr, self._dense_modules[g.name])

    def is_dense(self) -> bool:
        return all(a is b for a, b in zip(self.blocks(), self._dense_blocks)) and all(
            getattr(self._dense_blocks[g.block], g.attr) is self._dense_modules[g.name] for g in self.unit_groups())

    def module(self, group: UnitGroup) -> nn.Module:
        """The module currently installed for the group."""
        return getattr(self._dense_blocks[group.block], group.attr)

    def install(self, group: UnitGroup, module: nn.Module) -> None:
        # units live in the dense block, whatever its slot holds now (a feature cache's wrapper)
        setattr(self._dense_blocks[group.block], group.attr, module)

    def install_block(self, index: int, block: nn.Module) -> None:
        self.blocks()[index] = block

    # --- feature caching (docs/DESIGN.md: Vocabulary, cache interval) --------------------------
    # The residual streams through one block, for block caching: (argument name, position in the
    # block's forward, index in the block's output tuple, or None when the block returns the tensor).
    block_io: tuple[tuple[str, int, int | None], ...] = (("hidden_states", 0, None),)
    # Whether `blocks()` run one after another, each on the previous block's `block_io` streams and the
    # same other arguments: block-by-block calibration then carries activations from block to block
    # (pruners/carry.py) instead of re-running the blocks before the current one
    carries_blocks = True

    def cache_points(self) -> "BlockCachePoints | UNetCachePoints":
        """Where this denoiser can cache features: by default block caching over `blocks()` (every
        transformer family; `block_io` names the streams); UNets declare their skip branches."""
        return BlockCachePoints(len(self.blocks()))

    def default_levels(self, kind: str = "width") -> int:
        """H: the head count of the narrowest attention (width) or the block count (depth)."""
        if kind == "depth":
            return len(self.blocks())
        return min(g.size for g in self.unit_groups() if g.kind == "heads")

    def block_streams(self, args: tuple, kwargs: dict, output: Any) -> list[tuple[Tensor, Tensor]]:
        """(input, output) pairs [B, N, D] of the residual streams of one block call, from a forward
        hook's arguments, in `block_io` order (DiT/SDXL/PixArt: the hidden states; FLUX/SD3: image,
        then text — a stream the block does not return, SD3's context_pre_only last block, is left out)."""
        pairs = []
        for name, position, index in self.block_io:
            y = output if index is None else output[index]
            if y is not None:
                pairs.append((kwargs[name] if name in kwargs else args[position], y))
        return pairs


@dataclass(frozen=True)
class BlockCachePoints:
    """Block caching over `adapter.blocks()` (N blocks in forward order): branch b in [0, N) caches
    the residual that blocks [b, N) add to the streams named by `adapter.block_io`."""

    num_blocks: int


@dataclass(frozen=True)
class UNetCachePoints:
    """DeepCache skip branches of a diffusers UNet (`down_blocks`, `mid_block`, `up_blocks` of
    `unet`): branch b in [0, len(down_blocks)) keeps down block b and its mirror up block shallow and
    caches the hidden states the deeper blocks hand to that up block."""

    unet: nn.Module


class BlockSlots:
    """A flat, writable view of blocks held in several `nn.ModuleList`s, in forward order (the UNet's
    down/mid/up transformer blocks, FLUX's double- then single-stream blocks): what `blocks()`
    returns when a denoiser has no single block list."""

    def __init__(self, slots: Sequence[tuple[nn.ModuleList, int]]) -> None:
        self._slots = list(slots)  # (the list holding the block, its index there)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> nn.Module:
        holder, i = self._slots[index]
        return holder[i]

    def __setitem__(self, index: int, block: nn.Module) -> None:
        holder, i = self._slots[index]
        holder[i] = block

    def __iter__(self) -> Iterator[nn.Module]:
        return (holder[i] for holder, i in self._slots)


@dataclass
class TextCondition:
    """Prompt conditioning of text-to-image denoisers, batched like a tensor: `len`, slicing `[a:b]`,
    `.to(device)` and `TextCondition.concat`.

    `prompt_embeds` [B, L, D] (SDXL: [B, 77, 2048]; FLUX: T5 [B, 256, 4096]; SD3: CLIP-L+G padded to
    4096 then T5, [B, 77 + 256, 4096]; PixArt-Σ: T5 [B, 300, 4096]); `pooled_embeds` [B, P] or None
    for families without a pooled embedding (SDXL: [B, 1280]; FLUX: CLIP [B, 768]; SD3: [B, 2048];
    PixArt: None); `time_ids` [B, 6] SDXL micro-conditioning (original size, crop, target size) or
    None; `attention_mask` [B, L] (1 = real token, 0 = padding) for families whose denoiser masks the
    text tokens (PixArt's T5), else None; optional negative embeddings (same shapes, and a negative
    mask where there is a mask) stand for the unconditional half of classifier-free guidance
    instead of the adapter's default null condition.
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    time_ids: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_embeds: Tensor | None = None
    attention_mask: Tensor | None = None
    negative_attention_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or (self.pooled_embeds is not None and self.pooled_embeds.ndim != 2):
            raise ValueError(f"prompt_embeds must be [B, L, D] and pooled_embeds [B, P] (or None); got "
                             f"{tuple(self.prompt_embeds.shape)} and "
                             f"{None if self.pooled_embeds is None else tuple(self.pooled_embeds.shape)}")
        sizes = {f.name: getattr(self, f.name).shape[0] for f in fields(self) if getattr(self, f.name) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"TextCondition fields disagree on the batch size: {sizes}")
        for mask, embeds in ((self.attention_mask, self.prompt_embeds),
                             (self.negative_attention_mask, self.negative_prompt_embeds)):
            if mask is not None and (embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2])):
                raise ValueError(f"an attention mask must be [B, L] like its prompt embeddings; got "
                                 f"{tuple(mask.shape)} for {None if embeds is None else tuple(embeds.shape)}")
        negatives = [("negative_prompt_embeds", True), ("negative_pooled_embeds", self.pooled_embeds is not None),
                     ("negative_attention_mask", self.attention_mask is not None)]
        if self.negative_prompt_embeds is not None:
            wrong = [n for n, needed in negatives if (getattr(self, n) is not None) != needed]
            if wrong:
                raise ValueError(f"negative embeddings must mirror the positive ones (pooled and mask where those "
                                 f"are given); mismatched: {wrong}")
        elif any(getattr(self, n) is not None for n, _ in negatives):
            raise ValueError("negative_pooled_embeds / negative_attention_mask need negative_prompt_embeds")

    def map(self, fn: Callable[[Tensor], Tensor]) -> "TextCondition":
        """A new condition with `fn` applied to every tensor field."""
        return TextCondition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: slice | int | torch.Tensor) -> "TextCondition":
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextCondition":
        """Every field moved to `device`; floating fields cast to `dtype` (time ids keep theirs)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @staticmethod
    def concat(a: "TextCondition", b: "TextCondition") -> "TextCondition":
        """Both batches stacked (negatives kept only where both carry them)."""
        out = {}
        for f in fields(TextCondition):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if (x is None) != (y is None) and not f.name.startswith("negative"):
                raise ValueError(f"cannot concatenate conditions where only one has {f.name}")
            out[f.name] = None if x is None or y is None else torch.cat([x, y])
        return TextCondition(**out)


def keep_from_order(order: Tensor, removed: int) -> Tensor:
    """Kept unit indices (sorted) when the first `removed` units of a removal order go."""
    return torch.sort(torch.as_tensor(order, dtype=torch.long)[removed:]).values


AdapterFactory = Callable[..., DenoiserAdapter]
