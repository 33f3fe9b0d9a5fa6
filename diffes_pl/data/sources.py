"""Calibration image sources: the built-in digits, or anything Hugging Face `datasets` can load.

A source string is resolved once, eagerly (`resolve_source`), so that a missing local path is
refused when the datamodule is built; the rows are loaded by `datasets` itself (`open_source`),
which is where missing splits and columns are refused, before any image is decoded or encoded.

Accepted source strings:
- ``digits``: scikit-learn's 8×8 digits (built in, no download): a `datasets.Dataset` built in
  memory (`digits_dataset`: an Image and a ClassLabel column), read like every other source;
- a local folder of images (one subfolder per class gives the labels): ``imagefolder``;
- a local parquet file, or a folder holding ``*.parquet`` files: ``parquet``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``load_from_disk``;
- anything else is a Hugging Face hub dataset name (``ILSVRC/imagenet-1k``), loaded with
  ``datasets.load_dataset(name, split=split)`` (from the local cache when offline).

Images are preprocessed as DiT / ADM prepare ImageNet (`center_crop_arr`): RGB (or L for
1-channel denoisers), the shorter side resized to the target resolution (box-halving while the image
is at least twice too large, then bicubic), a center crop, and the linear map 0 → −1, 255 → +1.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

DIGITS = "digits"
DIGITS_COLUMNS = ("image", "label")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DATA_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl", ".zip", ".tar"}


class SourceError(ValueError):
    """A calibration source that cannot be used (missing split, missing column, wrong kind of data)."""


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: `kind` is digits | imagefolder | parquet | disk | hub; `location` is the
    absolute local path (local kinds) or the hub name."""

    kind: str
    location: str
    given: str

    @property
    def is_local(self) -> bool:
        return self.kind in ("imagefolder", "parquet", "disk")


def looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local path (a hub id is `owner/name` or `name`)."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    if source.count("/") >= 2:
        return True
    return Path(source).suffix.lower() in DATA_SUFFIXES | IMAGE_SUFFIXES


def first_data_kind(folder: Path) -> str | None:
    """'parquet' or 'imagefolder' after the first data file found (stops early: ImageNet-sized
    folders are not listed in full), None when the folder holds neither."""
    for _root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            suffix = Path(name).suffix.lower()
            if suffix == ".parquet":
                return "parquet"
            if suffix in IMAGE_SUFFIXES:
                return "imagefolder"
    return None


def resolve_source(source: str) -> SourceSpec:
    """Which loader serves `source`, without loading rows. A path that does not exist is refused here."""
    if not isinstance(source, str) or not source.strip():
        raise SourceError("source must be 'digits', a local folder / parquet file, or a Hugging Face dataset name")
    if source == DIGITS:
        return SourceSpec("digits", DIGITS, source)
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() == ".parquet":
                return SourceSpec("parquet", str(path), source)
            raise SourceError(f"calibration source {source} is a {path.suffix or 'suffix-less'} file; pass a folder "
                              "of images (one subfolder per class), a .parquet file or folder, or a hub dataset name")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return SourceSpec("disk", str(path), source)
        kind = first_data_kind(path)
        if kind is None:
            raise SourceError(f"calibration folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                              "and no parquet files; put the images there (one subfolder per class for labels)")
        return SourceSpec(kind, str(path), source)
    if looks_like_path(source):
        raise FileNotFoundError(
            f"calibration source {source} does not exist (resolved to {path.absolute()}); pass an existing folder "
            "of images, a .parquet file or folder, 'digits', or a Hugging Face dataset name such as ILSVRC/imagenet-1k")
    return SourceSpec("hub", source, source)


def open_source(spec: SourceSpec, split: str) -> Any:
    """The `datasets.Dataset` of `split` (rows stay on disk / in Arrow; nothing is decoded)."""
    import datasets

    if spec.kind == "digits":
        from .digits import digits_dataset

        try:
            return digits_dataset(split)
        except ValueError as err:
            raise SourceError(f"calibration source digits: {err}") from err
    try:
        if spec.kind == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=spec.location)
        elif spec.kind == "parquet":
            files = spec.location if spec.location.endswith(".parquet") else \
                sorted(str(p) for p in Path(spec.location).rglob("*.parquet"))
            loaded = datasets.load_dataset("parquet", data_files=files)
        elif spec.kind == "disk":
            loaded = datasets.load_from_disk(spec.location)
        else:
            loaded = datasets.load_dataset(spec.location, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        if spec.kind != "hub":
            raise SourceError(f"datasets could not load the {spec.kind} source {spec.location}: {err}") from err
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): download it first with network on, "
                "e.g. `python -c \"import datasets; datasets.load_dataset('%s', split='%s')\"`" % (spec.location, split)
                if offline else "check the name, accept its terms on the hub if it is gated, and log in "
                "(`hf auth login`)")
        raise SourceError(f"could not load the Hugging Face dataset {spec.location!r} (split {split!r}): {err}. "
                          f"{hint}; or pass a local folder of images / parquet file. (A local path "
                          f"{Path(spec.location).absolute()} does not exist either.)") from err
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise SourceError(f"calibration source {spec.given} has splits {sorted(loaded)}, not {split!r}; "
                              f"set split to one of them")
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise SourceError(f"calibration source {spec.given} loaded as {type(loaded).__name__}; "
                          "a map-style datasets.Dataset is needed (streaming/iterable datasets are not supported)")
    return loaded


def check_columns(columns: Sequence[str], given: str, image_column: str, label_column: str | None,
                  caption_column: str | None) -> None:
    """Refuses column names the source does not have, naming the ones it has."""
    for role, name in (("image_column", image_column), ("label_column", label_column),
                       ("caption_column", caption_column)):
        if name is not None and name not in columns:
            raise SourceError(f"calibration source {given} has no column {name!r} ({role}); its columns are "
                              f"{list(columns)}: set {role} to one of them"
                              + ("" if role == "image_column" else " (or to null for unconditional calibration)"))


def select_indices(total: int, nsamples: int, seed: int) -> tuple[Tensor, bool]:
    """`nsamples` row indices drawn without replacement by a generator seeded with `seed`.

    When the source has fewer rows than `nsamples`, whole permutations are concatenated (each row is
    used ⌈nsamples / total⌉ times at most; the copies are noised differently). Returns (indices,
    repeated)."""
    if total < 1:
        raise SourceError("the calibration source is empty")
    g = torch.Generator().manual_seed(int(seed))
    chunks = []
    left = nsamples
    while left > 0:
        perm = torch.randperm(total, generator=g)[:left]
        chunks.append(perm)
        left -= len(perm)
    return torch.cat(chunks), nsamples > total


def to_pil(value: Any) -> Any:
    """A PIL image from what an image column may hold: PIL, {'bytes'/'path'}, a path, an array."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, (np.ndarray, Tensor, list)):
        arr = np.asarray(value)
        if arr.dtype != np.uint8:
            raise SourceError(f"image arrays must be uint8 (0..255); got {arr.dtype}")
        return Image.fromarray(arr)
    raise SourceError(f"cannot read an image from a {type(value).__name__}; the image column must hold images")


def center_crop_arr(image: Any, resolution: int) -> Any:
    """DiT / ADM preprocessing: box-halve while ≥ 2× too large, bicubic resize of the shorter side to
    `resolution`, center crop to `resolution` × `resolution`."""
    from PIL import Image

    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def preprocess_image(value: Any, resolution: int, channels: int) -> Tensor:
    """One image → float32 [channels, resolution, resolution] in [-1, 1] (0 → −1, 255 → +1)."""
    if channels not in (1, 3):
        raise SourceError(f"images can be prepared for 1 (L) or 3 (RGB) channels, not {channels}")
    image = to_pil(value)
    if not (channels == 1 and image.mode == "F"):  # float grayscale on 0..255 (the digits) stays exact
        image = image.convert("L" if channels == 1 else "RGB")
    image = center_crop_arr(image, resolution)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


def caption_texts(values: Sequence[Any], given: str, caption_column: str) -> list[str]:
    """One caption per row from a caption column: a string, or a list of strings (the first is taken:
    COCO-captions rows hold five)."""
    out = []
    for i, value in enumerate(values):
        if isinstance(value, (list, tuple)):
            value = value[0] if len(value) else None
        if not isinstance(value, str) or not value.strip():
            raise SourceError(f"caption column {caption_column!r} of {given} holds {value!r} in a chosen row ({i}); "
                              "captions must be non-empty strings or lists of strings: fix the data or pick "
                              "another caption_column")
        out.append(value)
    return out


def labels_tensor(values: Sequence[Any], given: str, label_column: str) -> Tensor:
    """Class ids [N] int64 from a label column (ClassLabel or integer values)."""
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise SourceError(f"label column {label_column!r} of {given} holds {type(bad[0]).__name__} values "
                          f"(e.g. {bad[0]!r}); class-conditional denoisers need integer class ids: map them to "
                          "ids, use an imagefolder with one subfolder per class, or set label_column to null")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)
