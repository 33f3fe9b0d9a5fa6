"""The family registry: one record per denoiser family, and name → (family, source) resolution.

Shaped like diffusers' `hooks/_helpers.py` `TransformerBlockRegistry` (a class-level table filled by
`register` calls next to what they describe) and litgpt's `Config.from_name` (every known name in
one table). Each family module (`tiny.py`, `dit.py`, `sdxl.py`, `flux.py`, `sd3.py`, `pixart.py`)
registers ONE `Family` at import; `families()` imports every module of this package first, so a
lookup never depends on which module happened to be imported before, and a new family is one new
module — nothing else lists it (messages name families through `family_titles`). No module imports
a family module: what families share lives in modules below them (tests/test_layering.py). Nothing
outside `denoisers/` branches on a family name: it asks the record (or the adapter's declarations)
instead.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

# Families listed (and names matched) first, in this order; any other registered family follows, by name.
FIRST = ("tiny", "dit", "sdxl", "flux")
SOURCES = ("builtin", "hub", "folder")


class UnknownDenoiserError(ValueError):
    """The name is neither built in, nor a hub id some family serves, nor a local path."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family's pipeline, in pipeline order (diffusers layout)."""

    encoder: str  # transformers class: CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
    subfolder: str  # text_encoder, text_encoder_2, …
    tokenizer: str  # tokenizer, tokenizer_2, …
    pooled: bool  # its pooled output is the pooled text embedding the denoiser takes
    hidden_states: bool = True  # its hidden states are (part of) the prompt embeddings
    attention_mask: bool = False  # the denoiser takes its attention mask (PixArt's T5 alone does)
    # tokens it is padded to: None = CLIP's model_max_length (at most its positions), "text_len" =
    # the adapter's `text_len` (FLUX's T5: 256 for schnell)
    max_length: str | None = None


@dataclass(frozen=True)
class Family:
    """What the toolkit knows about one denoiser family before (and while) loading it.

    `load_builtin(family, name, weights, device, dtype)`, `load_hub(family, name, weights, device,
    dtype)` and `load_folder(family, path, device, dtype)` build the adapter (`load_denoiser` then
    moves the denoiser and VAE to `device`); `weights=False` builds the architecture from the config
    shipped for `name` in `hub_names`, with random weights. A local folder is always loaded with its
    weights.
    """

    name: str  # "tiny", "dit", "sdxl", "flux", "sd3", "pixart"
    # the DenoiserAdapter subclass: its class attributes are the family's declarations, its `family`
    # the name in store keys (the tiny family's adapter is DiTAdapter: "dit")
    adapter: type
    denoiser_class: str  # the diffusers model class (DiTTransformer2DModel, UNet2DConditionModel, …)
    pipeline_class: str | None  # the diffusers pipeline an export folder is written as (None: not exportable)
    denoiser_subfolder: str  # the denoiser's subfolder in that pipeline's folder
    hub_names: Mapping[str, str] = field(default_factory=dict)  # hub id (or built-in name) → shipped config asset
    folder_classes: tuple[str, ...] = ()  # `_class_name`s of local folders (pipeline or bare denoiser) it serves
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    load_builtin: Callable[..., Any] | None = None
    load_hub: Callable[..., Any] | None = None
    load_folder: Callable[..., Any] | None = None
    claims_hub_id: Callable[[str], bool] | None = None  # hub ids outside `hub_names` it still serves
    default_folder: bool = False  # serves local folders no family recognises by `_class_name`
    builtin: bool = False  # `hub_names` are built-in names (no hub), served by `load_builtin`
    title: str | None = None  # how messages name the family ("SDXL"); None: its `name`

    @property
    def conditioning(self) -> str:
        """"class" or "text", as the adapter class declares."""
        return self.adapter.conditioning


@dataclass(frozen=True)
class Resolved:
    """Which family and source (`builtin`, `hub`, `folder`) serve a denoiser name."""

    family: Family
    source: str

    def __str__(self) -> str:
        return self.family.name if self.source == "builtin" else f"{self.family.name}-{self.source}"


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family's record; a second record for the same name or hub name is refused."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"denoiser family {family.name!r} is registered twice")
    taken = {n: f.name for f in _FAMILIES.values() if f.name != family.name for n in f.hub_names}
    clashes = sorted(n for n in family.hub_names if n in taken)
    if clashes:
        raise ValueError(f"family {family.name!r} claims names already served by another family: {clashes}")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by name (every module of this package is imported first)."""
    _import_family_modules()
    # registration follows import order (whichever family module a caller imported first): names are
    # matched, and listed in messages, in a fixed order (FIRST, then by name)
    order = {name: i for i, name in enumerate(FIRST)}
    return dict(sorted(_FAMILIES.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


@functools.cache
def _import_family_modules() -> None:
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")


def family_of(name: str) -> Family:
    """The record of family `name` ("dit", "sdxl", …)."""
    known = families()
    if name not in known:
        raise KeyError(f"no denoiser family {name!r}; registered: {sorted(known)}")
    return known[name]


def known_names() -> list[str]:
    """Every built-in name and hub id with a shipped config, in `families()` order (for messages)."""
    return [n for f in families().values() for n in f.hub_names]


def family_titles(**declared: Any) -> str:
    """The families whose adapter declares every `declared` value, as messages name them, in
    `families()` order: `family_titles(conditioning="text")` → "SDXL, FLUX, PixArt-Σ, SD3"."""
    return _titles(f for f in families().values()
                   if all(getattr(f.adapter, key) == value for key, value in declared.items()))


def _titles(selected: Iterable[Family]) -> str:
    return ", ".join(f.title or f.name for f in selected)


def _class_name(config: Path) -> str | None:
    """`_class_name` of a config, a routed model's (`Routed<Class>`, routed_model.py) read as its
    dense class: the family is the same."""
    try:
        name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return name.removeprefix("Routed") if isinstance(name, str) else name


def folder_family(path: Path) -> Family:
    """The family of a local folder: a diffusers pipeline folder (model_index.json) or a bare denoiser
    folder (config.json), recognised by `_class_name`; else the family serving unrecognised folders."""
    known = families().values()
    subfolders = sorted({f.denoiser_subfolder for f in known})
    for config in (path / "model_index.json", path / "config.json", *(path / s / "config.json" for s in subfolders)):
        cls = _class_name(config)
        for family in known:
            if cls in family.folder_classes:
                return family
    return next(f for f in known if f.default_folder)


def is_hub_id(name: str) -> bool:
    """`org/name` as the Hugging Face hub spells a repository: exactly one slash, no leading dot, slash
    or tilde (those, like more slashes, make a path)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*", name) is not None


def is_path(name: str) -> bool:
    """Whether `name` means a local folder: it exists as a path, starts like one ("/", "./", "../",
    "~") or has a path separator without being shaped like a hub id."""
    if not name:
        return False
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if Path(name).expanduser().exists():
        return True
    separators = {os.path.sep, os.path.altsep} - {None}
    return any(sep in name for sep in separators) and not is_hub_id(name)


def resolve(name: str) -> Resolved:
    """Which family and source serve `name`, without loading anything (a local folder's JSON configs
    are read); unknown names and missing folders are refused here, before any long work.

    A built-in name is built in; a path (`is_path`: an existing one, or one that starts like a path) is
    a local folder; an `org/name` hub id is served by the family that ships its config or claims it."""
    known = families()
    for family in known.values():
        if family.builtin and name in family.hub_names:
            return Resolved(family, "builtin")
    if is_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"local checkpoint {name} does not exist; pass an existing folder or a hub id")
        return Resolved(folder_family(path), "folder")
    for family in known.values():
        if name in family.hub_names:
            return Resolved(family, "hub")
    for family in known.values():
        if family.claims_hub_id is not None and family.claims_hub_id(name):
            return Resolved(family, "hub")
    claimed = _titles(f for f in known.values() if f.claims_hub_id is not None)
    what = (f"unknown hub id {name!r}: no denoiser family serves it, and no folder {name} exists"
            if is_hub_id(name) else f"unknown denoiser {name!r}")
    raise UnknownDenoiserError(
        f"{what}: use one of {known_names()}, " + (f"a {claimed} hub id, " if claimed else "")
        + "or a local folder (e.g. ./models/DiT-XL-2-256)")


class DenoiserUnavailableError(OSError):
    """A hub model that is not in the local Hugging Face cache while the hub is offline."""


def check_cached(name: str, resolved: Resolved) -> None:
    """Refuses (DenoiserUnavailableError) hub id `name` when the hub is offline and the local Hugging
    Face cache does not hold its denoiser's config: loading would fail only after a long wait, or with
    a message about something else. Online, or cached, nothing is checked (diffusers downloads)."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE  # what `huggingface_hub.is_offline_mode()` answers (HF_HUB_OFFLINE=1)
    if resolved.source != "hub" or not offline:
        return
    cache = constants.HF_HUB_CACHE
    found = try_to_load_from_cache(name, f"{resolved.family.denoiser_subfolder}/config.json", cache_dir=cache)
    if not isinstance(found, str):
        raise DenoiserUnavailableError(
            f"could not load {name!r}: it is not in the local Hugging Face cache ({cache}) and the hub is "
            f"offline; download it first (hf download {name}), or pass a local folder")
