"""Feature networks for FID / IS / precision-recall, and real-image features cached on disk.

- `digits`: the committed digits classifier (`DigitsFeatures`): 128-d features, 10 logits. Used for
  the built-in model; no download.
- `inception`: torch-fidelity's InceptionV3 (the TF-ported network every published FID uses), its
  public `FeatureExtractorInceptionV3`: 2048-d pool features, 1008 unbiased logits, one pass. Its
  weights live in the torch hub cache (torch-fidelity downloads them with torch.hub); when they are
  missing offline the error says where and how to pre-fetch them, at once.

Real-image features are computed once per (dataset, resolution, feature network) and cached as
safetensors under a cache folder.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFES_PL_OFFLINE")


class WeightsMissingError(FileNotFoundError):
    """A metric's network weights are not on disk and cannot (or may not) be downloaded."""


def offline() -> bool:
    """True when the environment forbids downloads (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, DIFFES_PL_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def inception_weights_path() -> Path:
    """Where torch.hub (and torch-fidelity) keep the FID Inception weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class FeatureNetwork:
    """Images [N, C, H, W] in [0, 1] → features [N, D] and class logits [N, K] (float64, CPU)."""

    name: str = ""

    def extract(self, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
        """{"features": [N, D], "logits": [N, K]}, computed in batches."""
        feats, logits = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                f, l = self._forward(images[start:start + batch_size])
                feats.append(f.double().cpu())
                logits.append(l.double().cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class DigitsNetwork(FeatureNetwork):
    """The digits classifier as feature network (images [N, 1, 8, 8])."""

    name = "digits-cnn"

    def __init__(self) -> None:
        from .digits_features import DigitsFeatures

        self.features, self.logits = DigitsFeatures(), DigitsFeatures(logits=True)

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float()
        return self.features(x), self.logits(x)


class InceptionNetwork(FeatureNetwork):
    """torch-fidelity InceptionV3 (FID pool3 2048-d features, IS unbiased logits)."""

    name = "inception-v3-compat"

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        path = Path(weights) if weights else inception_weights_path()
        problems = []
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            problems.append("torch-fidelity is not installed: pip install torch-fidelity")
        if not path.is_file():
            if weights or offline():
                problems.append(
                    f"the Inception weights {INCEPTION_FILE} are not in the torch hub cache {path.parent} "
                    f"(TORCH_HOME decides where it is); pre-fetch them on a machine with network: "
                    f"python -c \"import torch; torch.hub.load_state_dict_from_url('{INCEPTION_URL}')\" "
                    f"(or curl -L -o {path} {INCEPTION_URL})")
            else:
                path = None  # online: torch-fidelity downloads them into the cache
        if problems:
            raise WeightsMissingError("FID/IS/precision-recall need the Inception network: " + "; ".join(problems))
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # with a path it loads that file; with None it downloads into the torch hub cache (online only)
        self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=None if path is None else str(path))

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float().clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x * 255).round().to(torch.uint8)  # the network expects uint8 RGB and resizes to 299 itself
        feats, logits = self.net(x.to(next(self.net.parameters()).device))  # one pass, both features
        return feats.reshape(len(x), -1), logits.reshape(len(x), -1)


def feature_network(name: str) -> FeatureNetwork:
    """`digits` or `inception`."""
    if name == "digits":
        return DigitsNetwork()
    if name == "inception":
        return InceptionNetwork()
    raise ValueError(f"unknown feature network {name!r}; use 'digits' (built-in model) or 'inception'")


# --- real images ---------------------------------------------------------------------------------

def load_reference(reference: str) -> tuple[str, Callable[[], Tensor]]:
    """A reference image set by name: `digits-test` (the held-out real digits), a tensor file
    (.pt / .safetensors holding images [N, C, H, W] in [0, 1]) or a folder of PNG/JPEG images.
    Returns (dataset id for cache keys, loader of images [N, C, H, W] float in [0, 1])."""
    if reference == "digits-test":
        def digits() -> Tensor:
            from ..data.digits import load_digits_split

            return (load_digits_split("test")[0] + 1) / 2

        return "digits-test", digits
    path = Path(reference)
    if not path.exists():
        raise FileNotFoundError(f"reference images {reference!r} not found: give `digits-test`, a tensor file "
                                "(.pt/.safetensors, images [N, C, H, W] in [0, 1]) or a folder of PNG/JPEG images")
    ident = f"{path.name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    if path.is_dir():
        return ident, lambda: _read_folder(path)
    return ident, lambda: _read_tensor(path)


def _read_tensor(path: Path) -> Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        images = tensors.get("images", next(iter(tensors.values())))
    else:
        images = torch.load(path, map_location="cpu", weights_only=True)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _read_folder(path: Path) -> Tensor:
    from torchvision.io import ImageReadMode, read_image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images in the reference folder {path}")
    return torch.stack([read_image(str(f), ImageReadMode.RGB) for f in files]).float() / 255


def real_features(reference: str, resolution: int, network: FeatureNetwork, cache_dir: str | os.PathLike,
                  log: Callable[[str], None] = print) -> dict[str, Tensor]:
    """Features and logits of the reference images, computed once and cached at
    <cache_dir>/<dataset>_<resolution>px_<network>.safetensors (written atomically)."""
    from safetensors.torch import load_file, save_file

    from ..io import atomic_path

    dataset, load = load_reference(reference)
    path = Path(cache_dir) / f"{dataset}_{resolution}px_{network.name}.safetensors"
    if path.is_file():
        return load_file(str(path))
    images = load()
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bicubic",
                                                 antialias=True).clamp(0, 1)
    out = network.extract(images)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    log(f"reference features of {dataset} ({len(images)} images, {network.name}) cached at {path}")
    return out
