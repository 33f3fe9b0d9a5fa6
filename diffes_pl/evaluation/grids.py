"""Image grids people look at: eval/<row>/grid.png and the SampleGrid callback's samples.png.

Small images (the built-in model's 8×8 digits) are enlarged by whole factors, nearest neighbour, so
that every image is at least `MIN_SIZE` pixels high and each source pixel stays a sharp square; the
pixels themselves are never resampled in between.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

MIN_SIZE = 64  # pixels: an 8×8 digit becomes 64×64


def upscaled(images: Tensor, min_size: int = MIN_SIZE) -> Tensor:
    """Images [N, C, H, W] enlarged by the smallest whole factor that makes H ≥ min_size (nearest
    neighbour); images already that large are returned as they are."""
    factor = -(-min_size // images.shape[-2])
    if factor <= 1:
        return images
    return torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest")


def image_grid(images: Tensor, per_row: int = 8) -> Tensor:
    """Images [N, C, H, W] in [0, 1] → one uint8 grid [C, H', W'] (upscaled, 2-pixel white gaps)."""
    from torchvision.utils import make_grid

    grid = make_grid(upscaled(images), nrow=min(per_row, len(images)), padding=2, pad_value=1.0)
    grid = grid[:1] if images.shape[1] == 1 else grid  # make_grid repeats 1-channel images to RGB
    return (grid * 255).round().to(torch.uint8)


def labelled_rows(rows: Sequence[tuple[str, Tensor]], font_size: int = 14) -> Any:
    """One RGB PIL image: row i is rows[i]'s images [N, C, H, W] in [0, 1] (upscaled), its label
    written in a white margin on the left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    strips = [image_grid(images, per_row=len(images)) for _, images in rows]
    strips = [s.expand(3, -1, -1) if s.shape[0] == 1 else s for s in strips]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 8 + max(int(draw.textlength(label, font=font)) for label, _ in rows)
    width = margin + max(s.shape[2] for s in strips)
    canvas = Image.new("RGB", (width, sum(s.shape[1] for s in strips)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for (label, _), strip in zip(rows, strips):
        canvas.paste(Image.fromarray(strip.permute(1, 2, 0).numpy()), (margin, top))
        draw.text((4, top + strip.shape[1] // 2), label, fill="black", font=font, anchor="lm")
        top += strip.shape[1]
    return canvas
