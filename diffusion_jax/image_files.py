"""A folder of image files as training data: its listing, and each file decoded to a uint8 square.

**Listing** (:func:`list_folder`) follows the ImageFolder convention: if the root holds
subfolders, each is a class (sorted by name, labelled 0, 1, ...) and every image below it, at any
depth, has its label; otherwise the images in the root itself are the data, unlabelled (-1).
Images are the files whose names end in one of :data:`IMAGE_SUFFIXES`, in any case; names
starting with a dot (``.DS_Store``, ``._x.jpg`` of macOS, ``.ipynb_checkpoints/``) are ignored.
Paths are sorted, so the order is the same on every host and every run. Everything goes through
etils.epath (:func:`diffusion_jax.storage.path`), so ``gs://bucket/images`` works as the
workdir does.

**Decoding** (:func:`decode`) takes any image PIL opens, in any mode, applies the EXIF orientation
(a phone photo comes out the way viewers show it), drops the alpha channel (the colour under it
is kept, not blended) and brings 16-bit grey to 8 bits, then does the DDPM code's preprocessing
(:func:`center_crop_resize`): its LSUN data (StyleGAN2's ``dataset_tool.py create_lsun``) and its
tfds datasets take the centre square of side min(H, W) and resize it to the model's size with an
antialiased filter. We resize with PIL's bilinear filter, which, when shrinking, averages over
the whole footprint of each output pixel as ``tf.image.resize(antialias=True)`` does (the
original's LSUN tool used PIL's Lanczos filter, ``Image.ANTIALIAS``): :data:`RESAMPLE`.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_jax import errors, storage
from diffusion_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # matched in any case
RESAMPLE = Image.BILINEAR  # antialiased when downscaling: the filter's support grows with the scale
PREPROCESSING = ("EXIF orientation applied, alpha dropped, 16-bit grey scaled to 8 bits; centre square of "
                 "side min(H, W); PIL bilinear resize (antialiased); grey repeated to RGB, RGB to grey by "
                 "PIL's convert('L')")
# modes whose pixels PIL's convert("L") would clip at 255 rather than scale: 16-bit grey (and "I")
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_GREY_MODES = ("1", "L", "LA", "La", "F") + _WIDE_GREY_MODES
# what PIL raises on a corrupt or truncated file, by format: a file we cannot read, not a bug of ours
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error,
                  Image.DecompressionBombError)


class UnreadableImageError(DataError):
    """A file that cannot be read or decoded as an image: ``name`` and the ``reason``, for a list of
    skipped files."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}; remove or replace it")
        self.name, self.reason = name, reason


class Folder(NamedTuple):
    """A folder's images: ``paths`` sorted, ``labels`` int32 [N] (-1 without classes) and the
    ``classes``' names (the first-level subfolders, sorted; empty without classes)."""

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]


def is_image_name(name: str) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_SUFFIXES`, in any case."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _no_images(root, others: list) -> DataError:
    """The error for a folder without images, saying what it does hold."""
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if others:
        held = f"it holds {len(others)} other file{'s' * (len(others) != 1)} (e.g. {others[0].name})"
    else:
        held = "it is empty"
    return DataError(f"no images ({suffixes}, in any case) in {root}: {held}; give a folder of images, or "
                     "of class subfolders of images")


def _class_images(class_dir) -> tuple[list, list]:
    """(images, other files) below a class folder, at any depth, hidden names left out."""
    images, others = [], []
    for directory, subfolders, files in class_dir.walk():
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # walk no further into them
        for name in files:
            if not name.startswith("."):
                (images if is_image_name(name) else others).append(directory / name)
    return images, others


def list_folder(root: str) -> Folder:
    """The images of the folder ``root`` (local or a URL) with their labels (ImageFolder's convention).

    A DataError names ``root`` when it is missing, is a file, or holds no images, and names the
    image found next to class folders, or the class folder without images, that breaks the
    convention.
    """
    root = storage.path(root, what="image folder")
    if not root.exists():
        raise DataError(f"no such directory: {root}; give the folder that holds the images")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a directory; give the folder that holds the images")
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    # names with an image suffix are taken as files without asking: one request each on an object store
    loose = [p for p in entries if is_image_name(p.name)]
    rest = [p for p in entries if not is_image_name(p.name)]
    class_dirs = [p for p in rest if p.is_dir()]
    if not class_dirs:
        if not loose:
            raise _no_images(root, rest)
        paths = sorted(os.fspath(p) for p in loose)
        return Folder(tuple(paths), np.full(len(paths), -1, np.int32), ())
    if loose:
        raise DataError(f"{loose[0]} is an image next to the class folders of {root} "
                        f"({', '.join(p.name for p in class_dirs[:3])}, ...): with subfolders, every image "
                        "must be inside one (its class); move it into one, or the subfolders out")
    labelled, others, empty = [], [p for p in rest if not p.is_dir()], []
    for label, class_dir in enumerate(class_dirs):
        images, other_files = _class_images(class_dir)
        labelled += [(os.fspath(p), label) for p in images]
        others += other_files
        if not images:
            empty.append(class_dir)
    if not labelled:
        raise _no_images(root, others)
    if empty:
        raise DataError(f"class folder {empty[0]} holds no images ({', '.join(IMAGE_SUFFIXES)}): each "
                        "subfolder of the root is a class; add images to it or remove it")
    labelled.sort()
    return Folder(tuple(p for p, _ in labelled), np.array([label for _, label in labelled], np.int32),
                  tuple(p.name for p in class_dirs))


def _crop_resize(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """An L or RGB PIL image as uint8 [S, S, channels]: centre square, resize, grey <-> colour.

    RGB to grey is converted before the resize (a third of the work); grey to RGB after it, by
    repetition, which commutes with the resize exactly.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2  # create_lsun's (W - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if channels == 1 and image.mode == "RGB":
        image = image.convert("L")
    if side != image_size:
        image = image.resize((image_size, image_size), RESAMPLE)
    array = np.asarray(image, np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return np.repeat(array, 3, axis=-1) if channels == 3 and array.shape[-1] == 1 else array


def _check_settings(image_size: int, channels: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def center_crop_resize(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """A uint8 image [H, W], [H, W, 1] or [H, W, 3] as uint8 [S, S, channels], S = ``image_size``:
    the centre square of side min(H, W), resized with :data:`RESAMPLE` (antialiased, as the DDPM
    code's data); grey repeated to RGB, or RGB made grey by PIL's ``convert("L")`` (ITU-R 601 luma).
    """
    _check_settings(image_size, channels)
    image = np.asarray(image)
    channels_in = image.shape[-1] if image.ndim == 3 else 1
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels_in not in (1, 3):
        raise ValueError(f"expected a uint8 image [H, W], [H, W, 1] or [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return _crop_resize(Image.fromarray(image), image_size, channels)


def _grey_or_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode L or RGB: alpha dropped (the colour under it kept), palettes and CMYK to RGB,
    16-bit grey scaled to 8 bits (x / 257, rounded) rather than clipped as ``convert("L")`` would."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in _WIDE_GREY_MODES:
        wide = np.asarray(image, np.float64)
        return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    if image.mode in _GREY_MODES:
        return image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P with transparency straight to RGB
    return image.convert("RGB")


def decode(data: bytes, image_size: int, channels: int, *, name: str = "image") -> np.ndarray:
    """An encoded image (PNG, JPEG, WebP, or anything PIL opens; any mode) as uint8 [S, S, channels],
    preprocessed as the module docstring says. A file PIL cannot read (corrupt, truncated, not an
    image) is an UnreadableImageError (a DataError) naming ``name``."""
    _check_settings(image_size, channels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now: a truncated file fails here, inside the try
            ImageOps.exif_transpose(image, in_place=True)
            return _crop_resize(_grey_or_rgb(image), image_size, channels)
    except UnidentifiedImageError as e:  # its message names a BytesIO object: ours says what it means
        raise UnreadableImageError(name, "not an image (no format PIL recognizes)") from e
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(name, f"not a readable image ({errors.described(e)})") from e


def read_image(path: str, image_size: int, channels: int) -> np.ndarray:
    """The image file ``path`` (local or a URL) decoded by :func:`decode`; a file that cannot be read
    or decoded is an UnreadableImageError (a DataError) naming it."""
    file = storage.path(path, what="image")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UnreadableImageError(os.fspath(file), f"cannot be read ({errors.described(e)})") from e
    return decode(data, image_size, channels, name=os.fspath(file))
