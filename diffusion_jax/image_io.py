"""Images on disk: [-1, 1] floats to uint8 and PNG grids."""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from diffusion_jax import storage


def to_uint8(x) -> np.ndarray:
    """Model-space images in [-1, 1] to uint8 by rounding (x + 1) * 127.5, as the FID protocol."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images):
    """uint8 images (NumPy or JAX) to model space: x / 127.5 - 1, in [-1, 1] (the DDPM code's data
    scaling)."""
    return images.astype(np.float32) / 127.5 - 1.0


def grid(images: np.ndarray, *, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """uint8 NHWC images (C = 1 or 3) as one uint8 [H, W, C] grid with a 1-pixel white gap, enlarged
    ``scale`` times."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
    return out.repeat(scale, axis=0).repeat(scale, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H, W, C] image (C = 1 or 3) encoded as PNG."""
    png = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
    return png.getvalue()


def save_png(image: np.ndarray, path) -> None:
    """Write a uint8 [H, W, C] image as a PNG to ``path`` (any filesystem of ``storage``)."""
    storage.write_bytes(storage.path(path), png_bytes(image))


def save_grid(images: np.ndarray, path, *, columns: int | None = None, scale: int = 1) -> None:
    """Write uint8 NHWC images as one PNG grid (``grid``) to ``path``."""
    save_png(grid(images, columns=columns, scale=scale), path)


class Panel(NamedTuple):
    """One line plot of :func:`save_plots`: y against x, with axis labels."""

    x: object
    y: object
    xlabel: str
    ylabel: str
    invert_x: bool = False
    marker: str | None = None


def save_plots(panels: list[Panel], title: str, path) -> None:
    """``panels`` side by side under ``title``, as a PNG at ``path`` (any filesystem of ``storage``);
    matplotlib on its Agg backend, so no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.plot(panel.x, panel.y, marker=panel.marker)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.invert_x:
            ax.invert_xaxis()
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(storage.path(path), png.getvalue())
