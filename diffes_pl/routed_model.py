"""The pruned denoiser as a diffusers model: `save_pretrained`, `from_pretrained`, `push_to_hub`.

`Routed<Class>` (`RoutedDiTTransformer2DModel`, `RoutedUNet2DConditionModel`,
`RoutedFluxTransformer2DModel`, `RoutedSD3Transformer2DModel`, `RoutedPixArtTransformer2DModel`) is
a family's diffusers model class carrying the routes of one schedule. Its folder is the dense
model's (config.json and weights, written by diffusers) plus
    routes/         the trajectory store cut down to what the schedule uses: per stage the removal
                    orders and the compensated weights at that stage's level
    schedule.json   levels, partition, H; for a joint schedule also its cache
    routing.json    the format, the denoiser's name, family and training noise schedule, and the
                    sha256 and size of every other file of the folder (checked before anything loads)

`from_pretrained` loads the dense weights with diffusers' own loader, opens the routes and routes:
a `Router` prepares every stage's sliced weights and a diffusers hook on the model switches them by
the timestep each call receives (`step_hook.py`), with the schedule's feature cache when it caches.
So the model samples pruned in any pipeline: a pipeline folder whose model_index.json names the
class as `["diffes_pl.routed_model", "Routed…"]` opens pruned with
`DiffusionPipeline.from_pretrained(folder)` — diffusers imports the class from this installed
package, no remote code. `save_pretrained` (and `push_to_hub`, which calls it) writes the DENSE
weights (routing is lifted for the write) and the routes; moving the model (`.to(device, dtype)`)
prepares the stages again where the weights now are.

`routed_denoiser(adapter, store, schedule)` makes one from a search's result: a new model object
that shares the adapter's dense weights (no copy) and routes; the adapter's own denoiser stays dense.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
# ModelMixin in this module's namespace is how diffusers' pipeline loader sees that a class named by
# model_index.json as ["diffes_pl.routed_model", …] is a model to open with `from_pretrained`
from diffusers import ModelMixin  # noqa: F401

from .denoisers import family_of
from .denoisers.base import DenoiserAdapter
from .denoisers.samplers import scheduler_config
from .integrity import DamagedFileError, check_files, file_records, seal_holds, sealed
from .io import write_json
from .routing import Router
from .schedule import Schedule
from .sparsity import pack_mask
from .trajectory import MANIFEST_SHA256, TrajectoryStore

FORMAT = "diffes-pl-routes/1"
ROUTING_FILE = "routing.json"
ROUTES, SCHEDULE = "routes", "schedule.json"
ROUTING_SHA256 = "routing_sha256"
PREFIX = "Routed"


def routes(store: TrajectoryStore, schedule: Schedule, adapter: DenoiserAdapter) -> Iterator[dict]:
    """Per stage, what routing reads of the store: the removal orders, and the compensated weights
    at that stage's level only; sparse stores: that level's mask (packed bits) and kept values."""
    for stage, level in enumerate(schedule.levels):
        tensors = {}
        if store.depth:
            tensors["blocks.order"] = store.block_order(stage)
        elif store.sparse:  # the routed level's mask, packed, and its values
            for name in adapter.sparse_linears() if level > 0 else ():
                tensors[f"{name}.removed.{level}"] = pack_mask(store.removed(stage, name, level))
                values = store.values(stage, name, level)
                if values is not None:
                    tensors[f"{name}.values.{level}"] = values
        else:
            for group in adapter.unit_groups():
                tensors[f"{group.name}.order"] = store.order(stage, group.name)
                weight = store.weight(stage, group.name, level)
                if weight is not None:
                    tensors[f"{group.name}.weight.{level}"] = weight
        yield tensors


class Routing:
    """What routes one `Routed*` model: its adapter, the store and schedule, and while on, the
    router, the schedule's feature cache and the step-source hook."""

    def __init__(self, model: torch.nn.Module, store: TrajectoryStore, schedule: Schedule, info: dict) -> None:
        self.store, self.schedule, self.info = store, schedule, info
        family = family_of(info["family"])
        self.adapter: DenoiserAdapter = family.adapter(model, info["name"])
        self.adapter.noise_schedule = scheduler_config(info["noise_schedule"])
        if info.get("text_len") is not None:
            self.adapter.text_len = int(info["text_len"])
        self.router: Router | None = None
        self.cache: Any = None
        self.source: Any = None

    @property
    def on(self) -> bool:
        return self.router is not None

    def start(self) -> None:
        """Prepares every stage where the model's weights are and hooks the step source."""
        from .caching import schedule_cache

        self.router = Router(self.adapter, self.store, self.schedule)
        self.cache = schedule_cache(self.adapter, self.schedule)
        self.source = self.router.attach(self.cache)

    def stop(self) -> None:
        """The dense model again: hook, cache and router removed."""
        if self.source is not None:
            self.source.remove()
        if self.cache is not None:
            self.cache.remove()
        if self.router is not None:
            self.router.remove()
        self.router = self.cache = self.source = None

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """The dense model inside the block (to write or move its weights); routing again after."""
        was_on = self.on
        self.stop()
        try:
            yield
        finally:
            if was_on:
                self.start()


class RoutedModelMixin:
    """Mixed in before a diffusers model class by `routed_class` (module docstring)."""

    @property
    def routing(self) -> Routing:
        routing = self.__dict__.get("_diffes_routing")
        if routing is None:
            raise ValueError(f"this {type(self).__name__} has no routes: open it with from_pretrained, or make it "
                             "with diffes_pl.routed_model.routed_denoiser(adapter, store, schedule)")
        return routing

    def route(self, store: TrajectoryStore, schedule: Schedule, info: dict, start: bool = True) -> None:
        """Gives the model its routes (and routes, unless `start` is False)."""
        old = self.__dict__.get("_diffes_routing")
        if old is not None:
            old.stop()
        self.__dict__["_diffes_routing"] = Routing(self, store, schedule, info)
        if start:
            self.__dict__["_diffes_routing"].start()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """The pruned model from a folder written by `save_pretrained` (or its hub repository, with
        `subfolder=`): routes checked first, dense weights by diffusers, then routed."""
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        info = verify(folder)
        kwargs.pop("subfolder", None)
        model = super().from_pretrained(str(folder), *args, **kwargs)
        store = TrajectoryStore.open(folder / ROUTES)
        model.route(store, Schedule.load(folder / SCHEDULE), info)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        push_to_hub: bool = False, **kwargs: Any) -> None:
        """The dense weights and config (diffusers' own writer, routing lifted), then routes/,
        schedule.json and routing.json; with `push_to_hub`, the folder is uploaded after."""
        hub = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs}
        routing = self.routing
        with routing.lifted():
            super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_routes(Path(save_directory), routing)
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(hub.get("repo_id", Path(save_directory).name), exist_ok=True,
                                  private=hub.get("private"), token=hub.get("token")).repo_id
            self._upload_folder(save_directory, repo_id, token=hub.get("token"),
                                commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))

    def _apply(self, fn: Any, recurse: bool = True):
        # `.to()`, `.half()`, `.cuda()`: the prepared stages live outside the module tree, so they are
        # prepared again from the moved dense weights rather than left behind
        routing = self.__dict__.get("_diffes_routing")
        if routing is None:
            return super()._apply(fn, recurse)
        with routing.lifted():
            return super()._apply(fn, recurse)


def write_routes(folder: Path, routing: Routing) -> None:
    """routes/, schedule.json and routing.json (sealed, with every other file's checksum) into `folder`."""
    store, schedule, adapter = routing.store, routing.schedule, routing.adapter
    manifest = {k: v for k, v in store.manifest.items() if k not in ("nbytes", "format", MANIFEST_SHA256)}
    TrajectoryStore.write(folder / ROUTES, manifest, routes(store, schedule, adapter))
    schedule.save(folder / SCHEDULE)
    info = {k: v for k, v in routing.info.items() if k not in ("files", ROUTING_SHA256)}
    write_json(folder / ROUTING_FILE, sealed({**info, "format": FORMAT,
                                              "files": file_records(folder, skip=(ROUTING_FILE,))}, ROUTING_SHA256))


def verify(folder: str | os.PathLike) -> dict:
    """routing.json of a routed model folder, after checking it and every file it lists: a damaged,
    changed or missing file raises `DamagedFileError` naming it, before any weight loads."""
    folder = Path(folder)
    path = folder / ROUTING_FILE

    def damaged(name: str, what: str) -> DamagedFileError:
        return DamagedFileError(f"routed model {folder}: {name} is damaged ({what}); save it again with "
                                "save_pretrained (or diffes_pl.export.save)")

    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a routed model folder (no {ROUTING_FILE}); write one with "
                                "save_pretrained, or open a dense model with its diffusers class")
    try:
        info = json.loads(path.read_text())
    except ValueError:
        raise damaged(ROUTING_FILE, "not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported routed model format "
                         f"{info.get('format') if isinstance(info, dict) else None!r} (this version reads {FORMAT})")
    if not seal_holds(info, ROUTING_SHA256):
        raise damaged(ROUTING_FILE, "checksum mismatch")
    check_files(folder, info["files"], damaged)
    return info


def _local_folder(name_or_path: str | os.PathLike, kwargs: dict) -> Path:
    """The model's folder on disk: a local one, or the hub repository's (its `subfolder`) downloaded
    by huggingface_hub (from its cache when offline)."""
    sub = kwargs.get("subfolder") or ""
    path = Path(name_or_path)
    if path.is_dir():
        return path / sub
    from huggingface_hub import snapshot_download

    root = snapshot_download(str(name_or_path), allow_patterns=[f"{sub}/*"] if sub else None,
                             revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                             token=kwargs.get("token"), local_files_only=kwargs.get("local_files_only", False))
    return Path(root) / sub


_CLASSES: dict[str, type] = {}


def routed_class(base: type) -> type:
    """`Routed<base>`: the diffusers model class `base` with routes (one class per base, importable
    from this module by name, which is what model_index.json records)."""
    name = PREFIX + base.__name__
    if name not in _CLASSES:
        cls = type(name, (RoutedModelMixin, base), {"__module__": __name__, "__qualname__": name,
                                                     "__doc__": f"{base.__name__} with the routes of one schedule "
                                                                f"(diffes_pl.routed_model)."})
        _CLASSES[name] = cls
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    # `Routed<diffusers model class>` on first use: what diffusers' loader asks this module for
    import diffusers

    base = getattr(diffusers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(base, type) and issubclass(base, ModelMixin):
        return routed_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def routed_denoiser(adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule,
                    start: bool = True) -> torch.nn.Module:
    """A `Routed*` model of `adapter`'s denoiser with `schedule`'s routes from `store`: a new model
    object over the SAME dense weights (nothing copied; `adapter` stays dense). It routes (unless
    `start` is False) in any pipeline, `save_pretrained` writes it, `push_to_hub` uploads it."""
    from accelerate import init_empty_weights

    dense = adapter.denoiser
    if not adapter.is_dense():
        raise RuntimeError("the adapter has a router installed; make the routed model from the dense denoiser")
    with init_empty_weights(include_buffers=False):  # parameters are taken from `dense` below
        model = routed_class(type(dense)).from_config(dense.config)
    model.load_state_dict(dense.state_dict(), strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.route(store, schedule, {"name": adapter.name, "family": adapter.family,
                                  "noise_schedule": adapter.noise_schedule, "text_len": adapter.text_len}, start)
    return model
