"""No-reference image quality through pyiqa: TOPIQ-NR and CLIP-IQA.

Weights are never fetched silently: pyiqa would try to download a missing file (offline: a hang
on the connection, then a traceback), so the files pyiqa will read are checked first and a missing
one is refused at once, naming the file, the folder to place it in and how to fetch it.
"""
from __future__ import annotations

import os
from pathlib import Path


class IQAWeightsMissingError(FileNotFoundError):
    """A weight file that pyiqa needs for a fitness metric is not in its cache."""


def weight_files(pyiqa_name: str) -> list[Path]:
    """The files pyiqa reads to build `pyiqa_name`, where it reads them (its cache folders, resolved
    now, as pyiqa resolves them: `$TORCH_HOME/hub`, default ~/.cache/torch/hub)."""
    import torch.hub
    from pyiqa.archs.clip_model import _MODELS as CLIP_MODELS
    from pyiqa.archs.topiq_arch import default_model_urls as TOPIQ_URLS
    from pyiqa.utils import download_util

    if pyiqa_name == "topiq_nr":  # the whole CFANet (backbone included) in one checkpoint
        url = TOPIQ_URLS["cfanet_nr_koniq_res50"]
        return [Path(download_util.DEFAULT_CACHE_DIR) / os.path.basename(url)]
    if pyiqa_name == "clipiqa":  # OpenAI CLIP RN50 with fixed prompts: CLIP's weights only
        return [Path(torch.hub.get_dir()) / "clip" / os.path.basename(CLIP_MODELS["RN50"])]
    raise ValueError(f"no weight list for pyiqa metric {pyiqa_name!r}")


# topiq_nr: the CFANet checkpoint holds the ResNet-50 backbone too (loaded strictly), so timm's own
# ImageNet download of the backbone, which pyiqa would otherwise start first, is not needed.
CREATE_KWARGS = {"topiq_nr": {"backbone_pretrain": False}, "clipiqa": {}}


def check_weights(name: str, pyiqa_name: str) -> None:
    missing = [path for path in weight_files(pyiqa_name) if not path.is_file()]
    if missing:
        path = missing[0]
        raise IQAWeightsMissingError(
            f"fitness metric {name!r}: pyiqa's weight file {path.name} is missing from {path.parent}; place it "
            f"there (on a machine with network, python -c \"import pyiqa; pyiqa.create_metric('{pyiqa_name}')\" "
            "downloads it to the same folder), or use metric: ssim")


def iqa_metric(name: str, pyiqa_name: str, higher_is_better: bool):
    from .metric import Metric

    try:
        import pyiqa  # noqa: F401
    except ImportError as err:
        raise ImportError(f"fitness metric {name!r} needs pyiqa ({err}); reinstall diffes-pl: pip install -e .") from None
    check_weights(name, pyiqa_name)
    holder: dict = {}

    def per_image(x):
        """[P] scores, one per image (the metric is their mean)."""
        if "m" not in holder:
            import pyiqa

            holder["m"] = pyiqa.create_metric(pyiqa_name, device=x.images.device, as_loss=False,
                                              **CREATE_KWARGS[pyiqa_name])
        images = x.images if x.images.shape[1] == 3 else x.images.repeat(1, 3, 1, 1)
        return holder["m"](images).reshape(-1)

    def fn(x):
        return per_image(x).mean()

    def per_probe(x):  # oriented: higher is better
        return per_image(x) if higher_is_better else -per_image(x)

    return Metric(name, fn, higher_is_better, per_probe)
