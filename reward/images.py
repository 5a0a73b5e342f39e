"""Images and the [-1, 1] tensors VAEs read and write: PIL to tensor, tensor to uint8 and PIL, PNG grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> Any:
    """[n, 3, H, W] in [-1, 1] -> a numpy array [n, H, W, 3] of uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Any]:
    """[n, 3, H, W] in [-1, 1] -> n PIL images."""

    return [Image.fromarray(a) for a in to_uint8(images)]


def image_to_tensor(image: Any, resolution: int) -> torch.Tensor:
    """RGB, resized to resolution x resolution (bilinear, aspect ignored, as the reference), scaled to [-1, 1]."""

    image = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


def save_image_grid(images: list[Any], rows: int, path: str | Path) -> Path:
    """A grid PNG of equally sized images, row-major."""

    cols = max(1, -(-len(images) // rows))
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
