"""Images on disk: [-1, 1] floats to uint8 and PNG grids."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from diffusion_jax import storage


def to_uint8(x) -> np.ndarray:
    """Model-space images in [-1, 1] to uint8 by rounding (x + 1) * 127.5, as the FID protocol."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path, *, columns: int | None = None, scale: int = 1) -> None:
    """Write uint8 NHWC images (C = 1 or 3) as one PNG grid with a 1-pixel gap, enlarged ``scale`` times,
    to ``path`` (any filesystem of ``storage``)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    png = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(png, format="PNG")
    storage.write_bytes(storage.path(path), png.getvalue())
