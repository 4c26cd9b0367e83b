"""Decoding and resizing of single images on the host, with Pillow (no TensorFlow).

Why Pillow and not tf.image: the pipeline must run where TensorFlow is absent (the GPU image), and
`benchmarks/input_throughput.py` measures the two side by side on decode + crop + resize of JPEGs
(README, "Data"). Pillow's decoder is libjpeg-turbo's accurate integer IDCT, the one that
decoded the reference arrays in ../shared/data, and it releases the GIL, so a thread pool scales.

Conventions: images are uint8 [H, W, 3] RGB numpy arrays. Grayscale becomes 3 equal channels, alpha
is dropped, 16-bit images (common in medical imaging) are scaled to 8 bits (x / 257).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from contrastood import errors

# Extensions that folder sources read; Pillow decodes each of these.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CROP_ATTEMPTS = 10  # proposals per random-resized crop, as in augment.py and torchvision


def decode(data: bytes, name: str) -> np.ndarray:
    """Encoded bytes (any format above) -> uint8 [H, W, 3]; DataError naming `name` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise errors.DataError(f"cannot decode image {name} ({type(error).__name__}: {error}); remove or replace "
                               "that file") from None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def as_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]."""
    if array.dtype != np.uint8:
        raise errors.DataError(f"{name}: images must be uint8 (0..255), got {array.dtype}; convert with "
                               "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) if they are floats in [0, 1]")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise errors.DataError(f"{name}: an image must be [H, W, 3] (RGB) or [H, W] (grayscale), got shape "
                               f"{array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (antialiased bilinear: Pillow's filter support grows when shrinking),
    then a centre crop to size x size. A no-op for an image that is already size x size."""
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    scale = size / min(height, width)
    new_h = max(size, int(round(height * scale)))
    new_w = max(size, int(round(width * scale)))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def crop_box(rng: np.random.Generator, height: int, width: int, area: tuple[float, float],
             aspect: tuple[float, float]) -> tuple[int, int, int, int]:
    """SimCLR's random crop box (top, left, h, w): area fraction ~ U(area), aspect (w / h) log-uniform.

    The same distribution as augment._sample_crop_box: of CROP_ATTEMPTS proposals the first that fits
    is taken, else the whole image.
    """
    uniforms = rng.random(2 * CROP_ATTEMPTS + 2)
    areas = (area[0] + uniforms[:CROP_ATTEMPTS] * (area[1] - area[0])) * height * width
    log_aspects = math.log(aspect[0]) + uniforms[CROP_ATTEMPTS:2 * CROP_ATTEMPTS] * (
        math.log(aspect[1]) - math.log(aspect[0]))
    aspects = np.exp(log_aspects)
    crop_h = np.round(np.sqrt(areas / aspects)).astype(np.int64)
    crop_w = np.round(np.sqrt(areas * aspects)).astype(np.int64)
    fits = np.flatnonzero((crop_h >= 1) & (crop_h <= height) & (crop_w >= 1) & (crop_w <= width))
    h, w = (int(crop_h[fits[0]]), int(crop_w[fits[0]])) if fits.size else (height, width)
    top = min(int(uniforms[-2] * (height - h + 1)), height - h)
    left = min(int(uniforms[-1] * (width - w + 1)), width - w)
    return top, left, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int, area: tuple[float, float],
                        aspect: tuple[float, float]) -> np.ndarray:
    """A SimCLR crop cut from the original image and resized to size x size in one resampling."""
    height, width = image.shape[:2]
    top, left, h, w = crop_box(rng, height, width, area, aspect)
    box = (left, top, left + w, top + h)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
