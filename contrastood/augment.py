"""SimCLR augmentations as pure JAX functions, run on-device inside the jitted train step.

Doing augmentation on the accelerator keeps the host pipeline a plain uint8 stream (no TF ops per
example) and lets one jit cover augment + forward + backward. Every random draw comes from a
per-example key (`jax.random.split(key, B)` + `vmap`), so the result for a given key is the same
however the batch is sharded across devices.

The recipe follows SimCLR (Chen et al. 2020, Appendix A; `simclr/tf2/data_util.py`):
random resized crop -> horizontal flip -> colour jitter (p=0.8, random order, clip after each op)
-> grayscale (p=0.2) -> clip to [0, 1]. Colour ops reproduce the `tf.image` definitions SimCLR
calls (`random_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`,
`rgb_to_grayscale`); the crop is resized bilinearly (SimCLR uses bicubic) with half-pixel centres.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# tf.image.rgb_to_grayscale weights (ITU-R BT.601 luma), which SimCLR's `to_grayscale` uses.
_GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Crop proposals tried per example before falling back to the whole image. Sampled all at once
# (no data-dependent loop) and the first that fits is taken, like tf's
# sample_distorted_bounding_box / torchvision's RandomResizedCrop (10 tries).
_CROP_ATTEMPTS = 10
# Channel axis of one image: -1 for [H, W, 3] (the public layout, and the helpers' default); -3 for the planar
# [3, H, W] that `_augment_batch` works in. With the 3 channels as the minor dimension, XLA:CPU's colour-op fusions
# ran 4x slower than as elementwise passes over whole [H, W] planes (README, "What makes the CPU step fast").
_PLANAR = -3
# Indices of the colour ops; a random permutation of these gives SimCLR's random order.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
# Each example makes ONE uniform draw of this many numbers and slices it into named fields:
# every jax.random call is a separate threefry hash for XLA to compile, and a dozen small draws
# per example made compilation ~3x slower. Fixed slots also keep draws independent of the config.
_CROP_UNIFORMS = 2 * _CROP_ATTEMPTS + 2  # area + aspect per attempt, then top and left offsets
_JITTER_UNIFORMS = 8  # brightness, contrast, saturation, hue amounts + 4 sort keys for the order
_FLIP, _COLOR_APPLY, _GRAY_APPLY = range(_CROP_UNIFORMS, _CROP_UNIFORMS + 3)
_JITTER_START = _CROP_UNIFORMS + 3
_NUM_UNIFORMS = _JITTER_START + _JITTER_UNIFORMS
_BRIGHTNESS_MODES = ("additive", "multiplicative")
AUGMENTATIONS = ("simclr", "standard")  # train.augmentation: SimCLR views, or pad-crop + flip


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """SimCLR augmentation hyper-parameters (CIFAR defaults: colour strength s = 0.5).

    Frozen and hashable so it can be closed over or passed as a static argument to `jax.jit`.
    `brightness` picks SimCLR v1's additive delta (`tf.image.random_brightness`, the default, as in
    the SimCLR paper) or SimCLR v2's multiplicative factor in [max(0, 1 - 0.8s), 1 + 0.8s].
    """

    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_strength: float = 0.5
    color_prob: float = 0.8
    grayscale_prob: float = 0.2
    brightness: str = "additive"
    # False when the data pipeline already cut the crop on the host from the original image
    # (data.pipeline): the device then flips and distorts colour only.
    crop: bool = True

    def __post_init__(self):
        # Normalise sequences (e.g. lists from a ConfigDict) to float tuples so the config stays
        # hashable, then validate everything once here rather than inside the traced code.
        for name in ("crop_area", "crop_aspect"):
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair of numbers, "
                                 f"got {value!r}") from None
            if not low <= high:
                raise ValueError(f"AugmentConfig.{name} must satisfy low <= high, got {value!r}")
            object.__setattr__(self, name, (low, high))
        low, high = self.crop_area
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"AugmentConfig.crop_area is a fraction of the image area and must lie "
                             f"in (0, 1], got {self.crop_area}")
        if self.crop_aspect[0] <= 0.0:
            raise ValueError(f"AugmentConfig.crop_aspect (width / height) must be positive, "
                             f"got {self.crop_aspect}")
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "crop", bool(self.crop))
        for name in ("color_strength", "color_prob", "grayscale_prob"):
            object.__setattr__(self, name, float(getattr(self, name)))
        # tf.image.random_contrast / random_saturation need lower = 1 - 0.8 s >= 0.
        if not 0.0 <= self.color_strength <= 1.25:
            raise ValueError(f"AugmentConfig.color_strength must be in [0, 1.25] (contrast and "
                             f"saturation factors 1 +- 0.8 s must stay >= 0), got {self.color_strength}")
        for name in ("color_prob", "grayscale_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability and must be in [0, 1], "
                                 f"got {getattr(self, name)}")
        if self.brightness not in _BRIGHTNESS_MODES:
            raise ValueError(f"AugmentConfig.brightness must be one of {_BRIGHTNESS_MODES}, "
                             f"got {self.brightness!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | Any) -> "AugmentConfig":
        """Builds a config from a dict or `ml_collections.ConfigDict`; unknown keys are errors.

        Unknown keys raise rather than being ignored so that a typo in a config override
        (`--config.augment.colour_strength=...`) cannot silently train with the defaults.
        """
        if hasattr(m, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
            m = m.to_dict()
        if not isinstance(m, Mapping):
            raise ValueError(f"AugmentConfig.from_mapping expects a dict or ConfigDict, got {type(m).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"Unknown augment config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(m))


def _check_images(images: Any, fn_name: str) -> None:
    dtype = getattr(images, "dtype", None)
    shape = getattr(images, "shape", None)
    if dtype is None or shape is None:
        raise ValueError(f"{fn_name} expects a uint8 array [B, H, W, 3], got {type(images).__name__}")
    if dtype != jnp.uint8:
        raise ValueError(f"{fn_name} expects uint8 images (raw pixels, 0..255), got dtype {dtype}; "
                         f"pass the undecoded uint8 batch, augmentation converts to float itself")
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{fn_name} expects NHWC RGB images [B, H, W, 3], got shape {tuple(shape)}; "
                         f"add a batch axis for a single image")


def to_float(images_uint8: jax.Array) -> jax.Array:
    """uint8 NHWC RGB -> float32 in [0, 1] (what every op below works on)."""
    _check_images(images_uint8, "to_float")
    return jnp.asarray(images_uint8).astype(jnp.float32) / 255.0


# --------------------------------------------------------------------------------------------
# Random resized crop.


def _lerp(uniform: jax.Array, low: float, high: float) -> jax.Array:
    """Maps U[0, 1) draws to U[low, high); exactly `low` when low == high."""
    return low + uniform * (high - low)


def _sample_crop_box(uniforms: jax.Array, height: int, width: int, area_range: tuple[float, float],
                     aspect_range: tuple[float, float]) -> jax.Array:
    """Turns `_CROP_UNIFORMS` U[0, 1) draws into an integer crop box (top, left, h, w) in the image.

    Area fraction ~ U(area_range), aspect ratio (width / height) log-uniform in aspect_range.
    Of `_CROP_ATTEMPTS` proposals the first whose rounded size fits is used; if none fits the box
    is the whole image, as SimCLR's distorted_bounding_box_crop falls back after its retries.
    """
    area = _lerp(uniforms[:_CROP_ATTEMPTS], *area_range) * (height * width)
    log_aspect = _lerp(uniforms[_CROP_ATTEMPTS:2 * _CROP_ATTEMPTS],
                       math.log(aspect_range[0]), math.log(aspect_range[1]))
    aspect = jnp.exp(log_aspect)
    crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    fits = (crop_h >= 1) & (crop_h <= height) & (crop_w >= 1) & (crop_w <= width)
    first = jnp.argmax(fits)
    crop_h = jnp.where(fits.any(), crop_h[first], height)
    crop_w = jnp.where(fits.any(), crop_w[first], width)
    # Uniform integer offset in [0, size - crop]; minimum() guards the u -> 1 rounding edge.
    top_u, left_u = uniforms[2 * _CROP_ATTEMPTS], uniforms[2 * _CROP_ATTEMPTS + 1]
    top = jnp.minimum(jnp.floor(top_u * (height - crop_h + 1)).astype(jnp.int32), height - crop_h)
    left = jnp.minimum(jnp.floor(left_u * (width - crop_w + 1)).astype(jnp.int32), width - crop_w)
    return jnp.stack([top, left, crop_h, crop_w])


def _interpolation_matrix(start: jax.Array, size: jax.Array, length: int) -> jax.Array:
    """[length, length] bilinear weights resampling the span [start, start + size) to `length` px.

    Half-pixel centres with edge clamping inside the span, i.e. the same (to float rounding) as
    `resize(image[start:start + size], length, bilinear)`, but with a traced start/size so it
    works under vmap/jit where dynamic slicing cannot. A matrix (instead of a gather) turns the
    resize into two small matmuls, which is what accelerators are fast at.
    """
    start = start.astype(jnp.float32)
    size = size.astype(jnp.float32)
    out_pos = jnp.arange(length, dtype=jnp.float32)
    # For size == length this is exactly start + i, so an uncropped image is reproduced bit-exactly.
    src = start + ((out_pos + 0.5) * size / length - 0.5)
    src = jnp.clip(src, start, start + size - 1.0)
    in_pos = jnp.arange(length, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(src[:, None] - in_pos[None, :]))


def _crop_resize_flip(image: jax.Array, box: jax.Array, flip: jax.Array | bool = False,
                      channel_axis: int = -1) -> jax.Array:
    """Crops `box` = (top, left, h, w) out of a float [H, W, C] image ([C, H, W] with channel_axis=-3),
    resizes it back to H x W bilinearly and mirrors it horizontally if `flip` (the flip is folded into the
    column weights)."""
    height, width = _spatial_shape(image, channel_axis)
    rows = _interpolation_matrix(box[0], box[2], height)
    cols = _interpolation_matrix(box[1], box[3], width)
    cols = jnp.where(flip, cols[::-1], cols)
    # HIGHEST: on GPU/TPU the default f32 matmul may run in tf32/bf16, which would blur pixel values.
    spec = "yh,hwc,xw->yxc" if channel_axis == -1 else "yh,chw,xw->cyx"
    return jnp.einsum(spec, rows, image, cols, precision=jax.lax.Precision.HIGHEST)


def _spatial_axes(channel_axis: int) -> tuple[int, int]:
    """(height, width) axes of an image whose channels are at `channel_axis` (-1 or _PLANAR)."""
    return (-3, -2) if channel_axis == -1 else (-2, -1)


def _spatial_shape(image: jax.Array, channel_axis: int) -> tuple[int, int]:
    return tuple(image.shape[axis] for axis in _spatial_axes(channel_axis))


def _split_channels(image: jax.Array, channel_axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jax.lax.index_in_dim(image, i, channel_axis, keepdims=False) for i in range(3))


def _along_channels(values, like: jax.Array, channel_axis: int) -> jax.Array:
    """A length-3 constant shaped to broadcast along `like`'s channel axis."""
    shape = [1] * like.ndim
    shape[channel_axis] = 3
    return jnp.asarray(values, like.dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Colour ops (tf.image semantics, on a single float [H, W, 3] image).


def _wrap(x: jax.Array, period: float) -> jax.Array:
    """x mod period via floor: jnp.mod (fmod) made the HSV round trip ~50x slower on XLA:CPU."""
    return x - period * jnp.floor(x / period)


def _rgb_to_hsv(rgb: jax.Array, channel_axis: int = -1) -> jax.Array:
    """RGB in [0, 1] -> HSV with hue in [0, 1] (colorsys / tf.image convention)."""
    red, green, blue = _split_channels(rgb, channel_axis)
    # Elementwise over the channel planes (the same values as a max/min reduction over the channel axis).
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    saturation = chroma / jnp.where(value > 0, value, 1.0)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(
        value == red, _wrap((green - blue) / safe_chroma, 6.0),
        jnp.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0))
    hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
    return jnp.stack([hue, saturation, value], axis=channel_axis)


def _hsv_to_rgb(hsv: jax.Array, channel_axis: int = -1) -> jax.Array:
    """HSV (hue in [0, 1], wraps) -> RGB, branch-free: c_n = v - v s clip(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B."""
    hue, saturation, value = (jax.lax.index_in_dim(hsv, i, channel_axis, keepdims=True) for i in range(3))
    k = _wrap(_along_channels([5.0, 3.0, 1.0], hsv, channel_axis) + 6.0 * hue, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _adjust_brightness(image: jax.Array, amount: jax.Array, mode: str) -> jax.Array:
    """SimCLR v1 adds a delta (tf.image.adjust_brightness); SimCLR v2 multiplies by a factor."""
    return image + amount if mode == "additive" else image * amount


def _adjust_contrast(image: jax.Array, factor: jax.Array, channel_axis: int = -1) -> jax.Array:
    """tf.image.adjust_contrast: scale each channel's deviation from its spatial mean."""
    mean = jnp.mean(image, axis=_spatial_axes(channel_axis), keepdims=True)
    return (image - mean) * factor + mean


def _adjust_hsv(image: jax.Array, saturation_factor: jax.Array, hue_delta: jax.Array,
                channel_axis: int = -1) -> jax.Array:
    """tf.image.adjust_saturation (s * factor, clipped to [0, 1]) and adjust_hue (h + delta, wrapped)
    in one HSV round trip; factor 1 / delta 0 leaves that part unchanged."""
    hue, saturation, value = _split_channels(_rgb_to_hsv(image, channel_axis), channel_axis)
    hue = _wrap(hue + hue_delta, 1.0)
    saturation = jnp.clip(saturation * saturation_factor, 0.0, 1.0)
    return _hsv_to_rgb(jnp.stack([hue, saturation, value], axis=channel_axis), channel_axis)


def _to_grayscale(image: jax.Array, channel_axis: int = -1) -> jax.Array:
    """tf.image.rgb_to_grayscale, tiled back to 3 channels so the network input shape is kept."""
    red, green, blue = _split_channels(image, channel_axis)
    gray = red * _GRAYSCALE_WEIGHTS[0] + green * _GRAYSCALE_WEIGHTS[1] + blue * _GRAYSCALE_WEIGHTS[2]
    return jnp.repeat(jnp.expand_dims(gray, channel_axis), 3, axis=channel_axis)


def _color_jitter(uniforms: jax.Array, image: jax.Array, strength: float, brightness_mode: str,
                  channel_axis: int = -1) -> jax.Array:
    """SimCLR's color_jitter_rand: the four ops in a per-example random order, clip after each.

    `uniforms` holds `_JITTER_UNIFORMS` U[0, 1) draws: the four op amounts, then four sort keys
    whose argsort is a uniformly random order (like tf.random.shuffle(tf.range(4))).
    """
    max_delta = 0.8 * strength
    if brightness_mode == "additive":
        brightness = _lerp(uniforms[0], -max_delta, max_delta)
    else:
        brightness = _lerp(uniforms[0], max(1.0 - max_delta, 0.0), 1.0 + max_delta)
    contrast = _lerp(uniforms[1], 1.0 - 0.8 * strength, 1.0 + 0.8 * strength)
    saturation = _lerp(uniforms[2], 1.0 - 0.8 * strength, 1.0 + 0.8 * strength)
    hue = _lerp(uniforms[3], -0.2 * strength, 0.2 * strength)
    order = jnp.argsort(uniforms[4:8])

    def apply_step(step, image):
        op = order[step]
        # Under vmap a per-example switch evaluates every branch anyway, so compute the three
        # candidates explicitly; saturation and hue share one HSV round trip.
        hsv_adjusted = _adjust_hsv(image,
                                   jnp.where(op == _SATURATION, saturation, 1.0),
                                   jnp.where(op == _HUE, hue, 0.0), channel_axis)
        image = jnp.where(op == _BRIGHTNESS, _adjust_brightness(image, brightness, brightness_mode),
                          jnp.where(op == _CONTRAST, _adjust_contrast(image, contrast, channel_axis), hsv_adjusted))
        return jnp.clip(image, 0.0, 1.0)

    # A loop rather than 4 unrolled steps: each step's image feeds 3 candidates, and XLA:CPU
    # fused the unrolled chain by recomputing producers (~3^4 work); the loop materialises it.
    return jax.lax.fori_loop(0, 4, apply_step, image)


# --------------------------------------------------------------------------------------------
# Public entry points.


def _augment_one(key: jax.Array, image: jax.Array, config: AugmentConfig, channel_axis: int = -1) -> jax.Array:
    """One SimCLR view of one float [H, W, 3] image ([3, H, W] with channel_axis=-3). The draws sit in
    fixed slots whatever the config, so e.g. turning colour jitter off does not change which crop an
    example gets."""
    uniforms = jax.random.uniform(key, (_NUM_UNIFORMS,))
    height, width = _spatial_shape(image, channel_axis)
    flip = uniforms[_FLIP] < 0.5 if config.flip else False
    if config.crop:
        box = _sample_crop_box(uniforms[:_CROP_UNIFORMS], height, width, config.crop_area, config.crop_aspect)
        image = _crop_resize_flip(image, box, flip, channel_axis)
    else:
        image = jnp.where(flip, jnp.flip(image, _spatial_axes(channel_axis)[1]), image)
    if config.color_prob > 0 and config.color_strength > 0:
        jittered = _color_jitter(uniforms[_JITTER_START:], image, config.color_strength, config.brightness,
                                 channel_axis)
        image = jnp.where(uniforms[_COLOR_APPLY] < config.color_prob, jittered, image)
    if config.grayscale_prob > 0:
        image = jnp.where(uniforms[_GRAY_APPLY] < config.grayscale_prob, _to_grayscale(image, channel_axis), image)
    return jnp.clip(image, 0.0, 1.0)


def _check_config(config: Any) -> None:
    if not isinstance(config, AugmentConfig):
        raise ValueError(f"config must be an AugmentConfig, got {type(config).__name__}; "
                         f"build one with AugmentConfig.from_mapping(config.augment)")


def augment_batch(key: jax.Array, images_uint8: jax.Array, config: AugmentConfig) -> jax.Array:
    """One SimCLR view per image: uint8 [B, H, W, 3] -> float32 [B, H, W, 3] in [0, 1].

    Example i uses `jax.random.split(key, B)[i]`, so its view depends only on (key, i, image) and
    not on how the batch is sharded. Jitted with `config` static (compiled once per config and
    shape when called eagerly; inlined when called inside another jit).
    """
    _check_config(config)
    _check_images(images_uint8, "augment_batch")
    return _augment_batch(key, images_uint8, config)


@functools.partial(jax.jit, static_argnums=2)
def _augment_batch(key: jax.Array, images_uint8: jax.Array, config: AugmentConfig) -> jax.Array:
    planar = jnp.moveaxis(to_float(images_uint8), -1, 1)  # [B, 3, H, W]
    keys = jax.random.split(key, planar.shape[0])
    views = jax.vmap(functools.partial(_augment_one, config=config, channel_axis=_PLANAR))(keys, planar)
    return jnp.moveaxis(views, 1, -1)


def two_views(key: jax.Array, images_uint8: jax.Array,
              config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """The two independently augmented views of each image that the NT-Xent loss contrasts.

    View v is `augment_batch(jax.random.split(key)[v], images, config)`.
    """
    _check_config(config)
    _check_images(images_uint8, "two_views")
    key_1, key_2 = jax.random.split(key)
    return _augment_batch(key_1, images_uint8, config), _augment_batch(key_2, images_uint8, config)


def views_of_host_crops(key: jax.Array, views_uint8: jax.Array,
                        config: AugmentConfig) -> tuple[jax.Array, ...]:
    """Flip and colour distortion of crops the host already cut: uint8 [B, V, H, W, 3] -> V float
    views [B, H, W, 3], view v keyed like `two_views` (jax.random.split(key, V)[v])."""
    _check_config(config)
    if config.crop:
        raise ValueError("views_of_host_crops needs AugmentConfig(crop=False): the crops are already cut")
    if views_uint8.ndim != 5:
        raise ValueError(f"views_of_host_crops expects uint8 [B, V, H, W, 3], got shape {views_uint8.shape}")
    keys = jax.random.split(key, views_uint8.shape[1])
    if views_uint8.shape[1] == 1:
        keys = [key]
    return tuple(_augment_batch(keys[v], views_uint8[:, v], config) for v in range(views_uint8.shape[1]))


def supervised_augment(key: jax.Array, images_uint8: jax.Array, *, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation (He et al. 2016): zero-pad by `pad`, random H x W crop,
    horizontal flip with p = 0.5. For plain supervised runs (e.g. the CLP ensemble members)."""
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    _check_images(images_uint8, "supervised_augment")
    return _supervised_augment(key, images_uint8, pad)


@functools.partial(jax.jit, static_argnums=2)
def _supervised_augment(key: jax.Array, images_uint8: jax.Array, pad: int) -> jax.Array:
    images = to_float(images_uint8)
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def augment_one(key, image):
        top_u, left_u, flip_u = jax.random.uniform(key, (3,))
        top = jnp.minimum(jnp.floor(top_u * (2 * pad + 1)).astype(jnp.int32), 2 * pad)
        left = jnp.minimum(jnp.floor(left_u * (2 * pad + 1)).astype(jnp.int32), 2 * pad)
        crop = jax.lax.dynamic_slice(image, (top, left, 0), (height, width, channels))
        return jnp.where(flip_u < 0.5, crop[:, ::-1], crop)

    return jax.vmap(augment_one)(jax.random.split(key, batch), padded)
