"""Tests for contrastood.augment: shapes/ranges, determinism, per-op golden values, sharding."""
import colorsys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contrastood import augment

# Helpers jitted once: eager JAX compiles every primitive separately, which dominated test time.
rgb_to_hsv = jax.jit(augment._rgb_to_hsv)
hsv_to_rgb = jax.jit(augment._hsv_to_rgb)
adjust_hsv = jax.jit(augment._adjust_hsv)
crop_resize_flip = jax.jit(augment._crop_resize_flip)

IDENTITY = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                                 color_prob=0.0, grayscale_prob=0.0)


def _images(batch=16, height=16, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _float_image(seed=0, shape=(12, 10, 3)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Input validation and config.


def test_to_float_scales_uint8_to_unit_interval():
    images = np.array([0, 1, 128, 255], np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
    out = augment.to_float(images)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], np.array([[0, 1], [128, 255]], np.float32) / np.float32(255))


@pytest.mark.parametrize("bad", [
    np.zeros((2, 8, 8, 3), np.float32),  # already float
    np.zeros((2, 8, 8, 3), np.int32),
    np.zeros((8, 8, 3), np.uint8),  # no batch axis
    np.zeros((2, 8, 8, 1), np.uint8),  # not RGB
    np.zeros((2, 3, 8, 8), np.uint8),  # NCHW
    [[1, 2, 3]],  # not an array
])
def test_bad_images_raise_value_error(bad):
    key = jax.random.PRNGKey(0)
    for fn in (augment.to_float, lambda x: augment.augment_batch(key, x, augment.AugmentConfig()),
               lambda x: augment.two_views(key, x, augment.AugmentConfig()),
               lambda x: augment.supervised_augment(key, x)):
        with pytest.raises(ValueError):
            fn(bad)


def test_config_from_mapping_and_validation():
    cd = ml_collections.ConfigDict({"crop_area": [0.2, 1.0], "color_strength": 1.0, "flip": False})
    config = augment.AugmentConfig.from_mapping(cd)
    assert config == augment.AugmentConfig(crop_area=(0.2, 1.0), color_strength=1.0, flip=False)
    hash(config)  # lists were normalised to tuples, so it can be a static jit argument
    assert augment.AugmentConfig.from_mapping({}) == augment.AugmentConfig()
    with pytest.raises(ValueError, match="colour_strength"):
        augment.AugmentConfig.from_mapping({"colour_strength": 0.5})
    for bad in (dict(crop_area=(0.5, 0.1)), dict(crop_area=(0.0, 1.0)), dict(crop_area=(0.1, 1.5)),
                dict(crop_aspect=(-1.0, 1.0)), dict(color_prob=1.5), dict(grayscale_prob=-0.1),
                dict(color_strength=2.0), dict(brightness="gamma"), dict(crop_area=0.5)):
        with pytest.raises(ValueError):
            augment.AugmentConfig(**bad)
    with pytest.raises(ValueError, match="AugmentConfig"):
        augment.augment_batch(jax.random.PRNGKey(0), _images(1), {"flip": True})


# ---------------------------------------------------------------------------------------------
# augment_batch / two_views behaviour.


def test_output_dtype_range_shape_and_determinism():
    images = _images(16, 24, 20)  # non-square, to catch height/width mix-ups
    key = jax.random.PRNGKey(0)
    config = augment.AugmentConfig(color_strength=1.0)
    out = augment.augment_batch(key, images, config)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, augment.augment_batch(key, images, config))
    other = augment.augment_batch(jax.random.PRNGKey(1), images, config)
    assert np.abs(np.asarray(out) - np.asarray(other)).mean() > 0.02
    # New-style typed keys work the same way as raw uint32 keys.
    typed = augment.augment_batch(jax.random.key(0), images, augment.AugmentConfig())
    assert typed.shape == images.shape


def test_two_views_are_independent_views_of_the_same_images():
    images = _images()
    view_1, view_2 = augment.two_views(jax.random.PRNGKey(3), images, augment.AugmentConfig())
    assert view_1.shape == view_2.shape == images.shape
    # Every example's two views differ (different crops / colours), not just some of them.
    per_example_diff = np.abs(np.asarray(view_1) - np.asarray(view_2)).mean(axis=(1, 2, 3))
    assert (per_example_diff > 1e-3).all()
    # Each view is a regular augment_batch draw from a sub-key, so both are reproducible.
    key_1, key_2 = jax.random.split(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(view_1, augment.augment_batch(key_1, images, augment.AugmentConfig()))
    np.testing.assert_array_equal(view_2, augment.augment_batch(key_2, images, augment.AugmentConfig()))


@pytest.mark.parametrize("config", [augment.AugmentConfig(color_strength=1.0, grayscale_prob=0.5),
                                    augment.AugmentConfig(brightness="multiplicative", crop=False)],
                         ids=["crop", "host_crops"])
def test_planar_batch_path_matches_the_channels_last_ops_per_image(config):
    # augment_batch works on [B, 3, H, W] planes (fast on CPUs); each view must be what the channels-last
    # ops give for that image and key, up to float32 rounding (the einsum's and grayscale's summation order).
    images = _images(32, 24, 20)
    key = jax.random.PRNGKey(5)
    channels_last = jax.jit(jax.vmap(lambda k, image: augment._augment_one(k, image, config)))(
        jax.random.split(key, len(images)), augment.to_float(images))
    np.testing.assert_allclose(augment.augment_batch(key, images, config), channels_last, atol=2e-6, rtol=0)


def test_colour_ops_agree_between_channel_layouts():
    # The same arithmetic in either layout; only XLA's fused multiply-adds may round differently.
    image = _float_image(shape=(12, 10, 3))
    planar = jnp.asarray(np.moveaxis(image, -1, 0))
    channels_last = {"rgb_to_hsv": rgb_to_hsv(image), "hsv_to_rgb": hsv_to_rgb(image),
                     "adjust_hsv": adjust_hsv(image, 1.3, 0.1),
                     "contrast": augment._adjust_contrast(jnp.asarray(image), 0.6),
                     "grayscale": augment._to_grayscale(jnp.asarray(image)),
                     "crop": crop_resize_flip(image, jnp.array([3, 2, 7, 6]), True)}
    planes = {"rgb_to_hsv": augment._rgb_to_hsv(planar, -3), "hsv_to_rgb": augment._hsv_to_rgb(planar, -3),
              "adjust_hsv": augment._adjust_hsv(planar, 1.3, 0.1, -3),
              "contrast": augment._adjust_contrast(planar, 0.6, -3),
              "grayscale": augment._to_grayscale(planar, -3),
              "crop": augment._crop_resize_flip(planar, jnp.array([3, 2, 7, 6]), True, -3)}
    for name, expected in channels_last.items():
        np.testing.assert_allclose(np.moveaxis(np.asarray(planes[name]), 0, -1), expected, atol=1e-6, rtol=0,
                                   err_msg=name)


def test_each_example_gets_its_own_crop():
    # Identical input images: any difference between outputs comes from per-example randomness.
    images = np.repeat(_images(1), 16, axis=0)
    crop_only = augment.AugmentConfig(flip=False, color_prob=0.0, grayscale_prob=0.0)
    out = np.asarray(augment.augment_batch(jax.random.PRNGKey(0), images, crop_only))
    distinct = {out[i].tobytes() for i in range(len(out))}
    assert len(distinct) == len(out)


def test_identity_config_reproduces_input_exactly():
    images = _images()
    out = augment.augment_batch(jax.random.PRNGKey(7), images, IDENTITY)
    np.testing.assert_array_equal(out, augment.to_float(images))


def test_flip_matches_np_flip_and_happens_about_half_the_time():
    images = _images(64, 16, 16)
    flip_only = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=True,
                                      color_prob=0.0, grayscale_prob=0.0)
    out = np.asarray(augment.augment_batch(jax.random.PRNGKey(0), images, flip_only))
    expected = np.asarray(augment.to_float(images))
    flipped = np.array([np.array_equal(o, np.flip(e, axis=1)) for o, e in zip(out, expected)])
    unchanged = np.array([np.array_equal(o, e) for o, e in zip(out, expected)])
    assert (flipped ^ unchanged).all()  # every output is exactly the image or its mirror
    assert 16 <= flipped.sum() <= 48  # p = 0.5 over 64 examples (fixed key, not flaky)


def test_grayscale_gives_equal_luma_channels_at_the_configured_rate():
    images = _images(64, 16, 16)
    gray_only = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                                      color_prob=0.0, grayscale_prob=1.0)
    out = np.asarray(augment.augment_batch(jax.random.PRNGKey(0), images[:4], gray_only))
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    luma = np.asarray(augment.to_float(images[:4])) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    np.testing.assert_allclose(out[..., 0], luma, atol=1e-6)

    half = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                                 color_prob=0.0, grayscale_prob=0.3)
    out = np.asarray(augment.augment_batch(jax.random.PRNGKey(1), images, half))
    is_gray = (out[..., 0] == out[..., 1]).all(axis=(1, 2)) & (out[..., 1] == out[..., 2]).all(axis=(1, 2))
    assert 8 <= is_gray.sum() <= 32  # ~19 of 64 expected


def test_color_jitter_changes_colours_at_the_configured_rate():
    images = _images(64, 16, 16)
    jitter_only = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                                        color_prob=0.5, grayscale_prob=0.0)
    out = np.asarray(augment.augment_batch(jax.random.PRNGKey(0), images, jitter_only))
    changed = ~np.array([np.array_equal(o, e) for o, e in zip(out, np.asarray(augment.to_float(images)))])
    assert 20 <= changed.sum() <= 44
    # Zero strength disables the jitter even when it is "applied".
    no_strength = augment.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False,
                                        color_prob=1.0, grayscale_prob=0.0, color_strength=0.0)
    np.testing.assert_array_equal(augment.augment_batch(jax.random.PRNGKey(0), images, no_strength),
                                  augment.to_float(images))


# ---------------------------------------------------------------------------------------------
# Crop sampling and resampling.


def test_crop_boxes_lie_inside_the_image_with_the_requested_area():
    uniforms = jax.random.uniform(jax.random.PRNGKey(0), (2000, augment._CROP_UNIFORMS))
    height, width = 32, 24
    sample = jax.jit(jax.vmap(lambda u: augment._sample_crop_box(u, height, width, (0.08, 1.0), (0.75, 4 / 3))))
    boxes = np.asarray(sample(uniforms))
    top, left, crop_h, crop_w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    area = crop_h * crop_w / (height * width)
    # Rounding to whole pixels can move the area a little outside the sampled range.
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert abs(np.median(area) - 0.54) < 0.1  # uniform area in [0.08, 1] (less a few fallbacks)
    aspect = crop_w / crop_h
    assert aspect[area > 0.2].min() > 0.6 and aspect[area > 0.2].max() < 1.6
    # Offsets are spread over all legal positions, not pinned to a corner.
    assert len(np.unique(top[crop_h < 16])) > 10


def test_crop_falls_back_to_the_full_image_when_nothing_fits():
    uniforms = jax.random.uniform(jax.random.PRNGKey(0), (50, augment._CROP_UNIFORMS))
    # Full area at aspect 2 cannot fit in a square image.
    sample = jax.jit(jax.vmap(lambda u: augment._sample_crop_box(u, 16, 16, (1.0, 1.0), (2.0, 2.0))))
    boxes = np.asarray(sample(uniforms))
    np.testing.assert_array_equal(boxes, np.tile([0, 0, 16, 16], (50, 1)))


@pytest.mark.parametrize("box", [(3, 2, 7, 7), (0, 0, 12, 10), (11, 0, 1, 10), (4, 2, 8, 8)])
def test_crop_resize_matches_jax_image_resize_of_the_static_crop(box):
    image = _float_image()
    top, left, h, w = box
    expected = jax.image.resize(image[top:top + h, left:left + w], image.shape, "linear")
    out = crop_resize_flip(jnp.asarray(image), jnp.array(box))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    out_flipped = crop_resize_flip(jnp.asarray(image), jnp.array(box), True)
    np.testing.assert_allclose(out_flipped, np.flip(np.asarray(expected), axis=1), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Colour ops against colorsys / numpy.


def _colour_test_pixels(n=500, seed=0):
    pixels = np.random.default_rng(seed).random((n, 3), dtype=np.float32)
    edge_cases = np.array([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                           [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.2, 0.2, 0.7], [0.9, 0.3, 0.3]], np.float32)
    return np.concatenate([edge_cases, pixels])


def test_rgb_hsv_round_trip_matches_colorsys():
    pixels = _colour_test_pixels()
    hsv = np.asarray(rgb_to_hsv(jnp.asarray(pixels)))
    expected_hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels.astype(np.float64)])
    hue_error = np.abs(hsv[:, 0] - expected_hsv[:, 0])
    np.testing.assert_allclose(np.minimum(hue_error, 1 - hue_error), 0, atol=1e-5)  # hue is circular
    np.testing.assert_allclose(hsv[:, 1:], expected_hsv[:, 1:], atol=1e-6)
    rgb = np.asarray(hsv_to_rgb(jnp.asarray(expected_hsv, jnp.float32)))
    expected_rgb = np.array([colorsys.hsv_to_rgb(*p) for p in expected_hsv])
    np.testing.assert_allclose(rgb, expected_rgb, atol=1e-6)
    np.testing.assert_allclose(hsv_to_rgb(jnp.asarray(hsv)), pixels, atol=1e-6)


def test_hue_shift_by_zero_is_identity():
    image = _float_image()
    np.testing.assert_allclose(adjust_hsv(jnp.asarray(image), 1.0, 0.0), image, atol=1e-6)


@pytest.mark.parametrize("saturation_factor,hue_delta", [(1.0, 0.1), (1.0, -0.35), (0.6, 0.0), (1.4, 0.05)])
def test_saturation_and_hue_match_colorsys(saturation_factor, hue_delta):
    pixels = _colour_test_pixels(seed=1)
    out = np.asarray(adjust_hsv(jnp.asarray(pixels), saturation_factor, hue_delta))
    expected = []
    for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels.astype(np.float64)):
        expected.append(colorsys.hsv_to_rgb((h + hue_delta) % 1.0, min(max(s * saturation_factor, 0.0), 1.0), v))
    np.testing.assert_allclose(out, np.array(expected), atol=1e-5)


def test_brightness_and_contrast_match_numpy():
    image = _float_image()
    np.testing.assert_allclose(augment._adjust_brightness(image, 0.3, "additive"), image + 0.3, atol=1e-7)
    np.testing.assert_allclose(augment._adjust_brightness(image, 1.3, "multiplicative"), image * 1.3, atol=1e-7)
    mean = image.mean(axis=(0, 1), keepdims=True)  # per channel, as tf.image.adjust_contrast
    np.testing.assert_allclose(augment._adjust_contrast(jnp.asarray(image), 0.6), (image - mean) * 0.6 + mean,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sharding and the supervised baseline augmentation.


def test_sharded_jit_matches_unsharded_result():
    devices = jax.devices()
    assert len(devices) == 8, "conftest forces 8 CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    images = _images(16)
    config = augment.AugmentConfig()
    key = jax.random.PRNGKey(42)
    sharded_images = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    augment_fn = jax.jit(augment.augment_batch, static_argnums=2,
                         out_shardings=NamedSharding(mesh, PartitionSpec("data")))
    sharded = augment_fn(key, sharded_images, config)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, augment.augment_batch(key, images, config), atol=1e-6)


def test_supervised_augment_is_a_padded_shifted_window_or_its_mirror():
    images = _images(32, 8, 8)
    out = np.asarray(augment.supervised_augment(jax.random.PRNGKey(0), images))
    assert out.shape == images.shape and out.dtype == np.float32
    padded = np.pad(np.asarray(augment.to_float(images)), ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets, flips = set(), 0
    for i in range(len(images)):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if np.array_equal(out[i], (lambda w: w[:, ::-1] if flip else w)(padded[i, top:top + 8, left:left + 8]))]
        assert matches, f"example {i} is not a crop of the padded image"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 10 and 6 <= flips <= 26
    no_pad = np.asarray(augment.supervised_augment(jax.random.PRNGKey(0), images, pad=0))
    expected = np.asarray(augment.to_float(images))
    assert all(np.array_equal(o, e) or np.array_equal(o, e[:, ::-1]) for o, e in zip(no_pad, expected))
    with pytest.raises(ValueError):
        augment.supervised_augment(jax.random.PRNGKey(0), images, pad=-1)
