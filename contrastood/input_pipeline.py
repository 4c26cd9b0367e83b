"""Dataset spec strings -> uint8 arrays and per-host batches.

This is the only module of the package that imports TensorFlow (for TFDS, image decoding and
antialiased resizing). Everything it hands out is plain numpy, so training and evaluation code never
touches TF. TF is hidden from accelerators at import time so it cannot grab GPU memory that JAX needs.

One string names any dataset, so configs and `--config.` overrides stay simple:

  tfds:NAME[:VERSION]:SPLIT   any TFDS image dataset, e.g. `tfds:cifar10:train`, `tfds:svhn_cropped:test`,
                              `tfds:cifar10:train[:90%]`.
  npz:PATH[+PATH...]          .npz files with `images` (uint8 N,H,W,3 or N,H,W) and `labels`
                              (-1 = unlabelled), optional `label_names`; several files are concatenated.
  folder:PATH[:SPLIT]         PATH[/SPLIT]/<class>/*.{png,jpg,jpeg}; classes sorted alphabetically.
  noise:gaussian[:N]          N (default 10000) images of per-pixel clip(N(0.5, 0.25^2), 0, 1); image i
  noise:uniform[:N]           depends only on (seed, i). Unlabelled.
  sklearn:digits[:SPLIT]      scikit-learn's 8x8 digits, SPLIT in {train, test, all} (default all): a
                              fixed stratified 75/25 split (seed 0).
  sklearn:photos[:N]          N (default 2000) random patches of scikit-learn's two sample photographs
                              (china.jpg, flower.jpg); unlabelled. Real photos with no download.

Options follow `#`, joined with `&`, and apply to every source in this order:
  fraction=A:B      keep positions [round(A*N), round(B*N)) of a fixed permutation of the source
                    (seed `fraction_seed`, default 0), so `#fraction=0:0.8` and `#fraction=0.8:1`
                    are disjoint and together cover the set. Kept examples stay in source order.
  classes=0,1,5 | 0-5 | 0-2,7   keep only these labels. By default they are relabelled to 0..k-1 in
                    the listed order (a model trained on `#classes=0-5` needs labels 0..5, and a
                    near-OOD set `#classes=6-9` is then a 4-class set); `relabel=0` keeps the
                    original labels, class names and class count.
  limit=N           keep the first N examples.
Example: `npz:/data/cifar10-test.npz#classes=6-9&limit=500`.

Every image is resized to `image_size` x `image_size` when it is not already that size: the shorter
side goes to `image_size` with antialiased bilinear, then a centre crop (a plain resize for square
images). Grayscale becomes 3 equal channels, an alpha channel is dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import queue
import re
import threading
import types
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

try:  # Must happen before TF initialises its devices; harmless if it already has.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:
    pass

VALID_KINDS = ("tfds", "npz", "folder", "noise", "sklearn")
VALID_OPTIONS = ("classes", "relabel", "fraction", "fraction_seed", "limit")
NOISE_KINDS = ("gaussian", "uniform")
SKLEARN_NAMES = ("digits", "photos")
DIGITS_SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SAMPLING_MODES = ("epoch", "uniform_class")

DEFAULT_NOISE_EXAMPLES = 10_000
DEFAULT_PHOTO_PATCHES = 2_000
_SPEC_EXAMPLES = ("'tfds:cifar10:test', 'npz:/data/cifar10-test.npz#classes=6-9', "
                  "'folder:/data/textures:test', 'noise:gaussian:10000', 'sklearn:digits:test'")
_RESIZE_CHUNK = 1024  # Images resized per TF call: bounds the float32 intermediate.


# ------------------------------------------------------------------------------------------------
# Spec parsing.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec string.

    Attributes:
      kind: one of VALID_KINDS.
      name: TFDS name (with `:VERSION` if given), '+'-joined npz paths, folder path, noise kind
        ('gaussian'/'uniform') or sklearn set ('digits'/'photos').
      split: the field after the name: a TFDS/folder/digits split, or the example count N for
        `noise` and `sklearn:photos`; None when omitted.
      options: raw `key=value` options after `#` (validated by parse_spec).
      raw: the spec string as given (stripped of surrounding whitespace).
    """
    kind: str
    name: str
    split: str | None
    options: Mapping[str, str] = dataclasses.field(hash=False)
    raw: str


class _Options(NamedTuple):
    """Typed view of DatasetSpec.options."""
    classes: tuple[int, ...] | None
    relabel: bool
    fraction: tuple[float, float] | None
    fraction_seed: int
    limit: int | None


def _spec_error(spec: str, problem: str) -> ValueError:
    return ValueError(f"Bad dataset spec {spec!r}: {problem}. Examples of valid specs: {_SPEC_EXAMPLES}.")


def _parse_positive_int(text: str, what: str, spec: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise _spec_error(spec, f"{what} must be a positive integer, got {text!r}")
    return int(text)


def _parse_classes(text: str, spec: str) -> tuple[int, ...]:
    """'0,1,5' / '0-5' / '0-2,7' -> class ids in the listed order (ranges inclusive)."""
    classes = []
    for item in text.split(","):
        item = item.strip()
        if match := re.fullmatch(r"(\d+)-(\d+)", item):
            first, last = int(match[1]), int(match[2])
            if first > last:
                raise _spec_error(spec, f"classes range {item!r} is empty; write it as low-high, e.g. 0-5")
            classes.extend(range(first, last + 1))
        elif re.fullmatch(r"\d+", item):
            classes.append(int(item))
        else:
            raise _spec_error(spec, f"classes must be comma-separated ids or inclusive ranges like "
                              f"'0,1,2' or '0-5', got {text!r}")
    if len(set(classes)) != len(classes):
        raise _spec_error(spec, f"classes {text!r} lists a class twice")
    return tuple(classes)


def _parse_options(option_text: str, spec: str) -> dict[str, str]:
    options = {}
    for item in option_text.split("&"):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise _spec_error(spec, f"option {item!r} is not key=value (options look like "
                              "'#classes=0-5&limit=100')")
        if key not in VALID_OPTIONS:
            raise _spec_error(spec, f"unknown option {key!r}; valid options: {', '.join(VALID_OPTIONS)}")
        if key in options:
            raise _spec_error(spec, f"option {key!r} given twice")
        options[key] = value
    return options


def _typed_options(options: Mapping[str, str], spec: str) -> _Options:
    """Validates option values; raises ValueError naming the fix."""
    classes = _parse_classes(options["classes"], spec) if "classes" in options else None
    relabel = classes is not None
    if "relabel" in options:
        if classes is None:
            raise _spec_error(spec, "relabel only applies together with classes=")
        if options["relabel"] not in ("0", "1"):
            raise _spec_error(spec, f"relabel must be 0 or 1, got {options['relabel']!r}")
        relabel = options["relabel"] == "1"
    fraction = None
    if "fraction" in options:
        parts = options["fraction"].split(":")
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            low, high = math.nan, math.nan
        if not 0.0 <= low < high <= 1.0:
            raise _spec_error(spec, f"fraction must be A:B with 0 <= A < B <= 1 (e.g. 0:0.8), "
                              f"got {options['fraction']!r}")
        fraction = (low, high)
    fraction_seed = 0
    if "fraction_seed" in options:
        if fraction is None:
            raise _spec_error(spec, "fraction_seed only applies together with fraction=")
        if not re.fullmatch(r"\d+", options["fraction_seed"]):
            raise _spec_error(spec, f"fraction_seed must be a non-negative integer, got "
                              f"{options['fraction_seed']!r}")
        fraction_seed = int(options["fraction_seed"])
    limit = _parse_positive_int(options["limit"], "limit", spec) if "limit" in options else None
    return _Options(classes, relabel, fraction, fraction_seed, limit)


def parse_spec(spec: str) -> DatasetSpec:
    """Parses a dataset spec string (see the module docstring); ValueError on anything malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "expected a non-empty string")
    raw = spec.strip()
    body, has_options, option_text = raw.partition("#")
    options = _parse_options(option_text, raw) if has_options else {}
    kind, sep, rest = body.partition(":")
    if kind not in VALID_KINDS:
        raise _spec_error(raw, f"unknown dataset kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
    if not sep or not rest:
        raise _spec_error(raw, f"nothing follows '{kind}:'")

    split: str | None = None
    if kind == "tfds":
        # The split may itself contain ':' (train[:90%]); an optional x.y.z version belongs to the name.
        match = re.fullmatch(r"(?P<name>[^:]+(?::\d+\.\d+\.\d+)?):(?P<split>.+)", rest)
        if not match:
            raise _spec_error(raw, "TFDS specs need a split: 'tfds:NAME:SPLIT', e.g. 'tfds:cifar10:test'")
        name, split = match["name"], match["split"]
    elif kind == "npz":
        name = rest
        if any(not path for path in name.split("+")):
            raise _spec_error(raw, "empty path in 'npz:PATH+PATH'")
    elif kind == "folder":
        # Only a last ':' field without '/' is a split, so 'gs://bucket/dir' stays a path.
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail:
            name, split = head, tail
        else:
            name = rest
    else:  # noise, sklearn
        name, _, split = rest.partition(":")
        split = split or None
        if kind == "noise":
            if name not in NOISE_KINDS:
                raise _spec_error(raw, f"unknown noise {name!r}; valid: {', '.join(NOISE_KINDS)}")
            if split is not None:
                _parse_positive_int(split, "the number of noise images", raw)
        else:
            if name not in SKLEARN_NAMES:
                raise _spec_error(raw, f"unknown sklearn set {name!r}; valid: {', '.join(SKLEARN_NAMES)}")
            if name == "digits" and split is not None and split not in DIGITS_SPLITS:
                raise _spec_error(raw, f"sklearn:digits split must be one of {', '.join(DIGITS_SPLITS)}, "
                                  f"got {split!r}")
            if name == "photos" and split is not None:
                _parse_positive_int(split, "the number of photo patches", raw)
    if not name:
        raise _spec_error(raw, "empty dataset name")
    _typed_options(options, raw)  # Fail at parse time, not after a long load.
    return DatasetSpec(kind=kind, name=name, split=split, options=types.MappingProxyType(options),
                       raw=raw)


# ------------------------------------------------------------------------------------------------
# In-memory datasets.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # Array fields: compare by identity, not elementwise.
class ArrayDataset:
    """A dataset materialised in host memory.

    Invariants (checked on construction): images uint8 [N, H, W, 3]; labels int32 [N]; either
    num_classes == 0, class_names == [] and all labels are -1 (unlabelled), or every label is in
    [0, num_classes) and len(class_names) == num_classes.
    """
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    num_classes: int
    name: str

    def __post_init__(self):
        images, labels = self.images, np.asarray(self.labels)
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
                and images.shape[-1] == 3):
            raise ValueError(f"{self.name}: images must be a uint8 numpy array [N, H, W, 3], got "
                             f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}.")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{self.name}: labels must have shape [{len(images)}], got {labels.shape}.")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self.name}: labels must be integers, got {labels.dtype}.")
        self.labels = labels.astype(np.int32, copy=False)
        self.class_names = [str(n) for n in self.class_names]
        if self.num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be >= 0, got {self.num_classes}.")
        if self.num_classes == 0:
            if np.any(self.labels != -1) or self.class_names:
                raise ValueError(f"{self.name}: an unlabelled dataset (num_classes=0) needs all labels -1 "
                                 "and no class_names.")
        else:
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"{self.name}: {len(self.class_names)} class_names for "
                                 f"{self.num_classes} classes.")
            _check_label_range(self.labels, self.num_classes, self.name)

    def __len__(self) -> int:
        return len(self.labels)


def _check_label_range(labels: np.ndarray, num_classes: int, name: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) for a labelled dataset, found "
            f"{sorted(set(bad.tolist()))[:5]}. Use -1 for every example of an unlabelled set, and "
            "give label_names covering all classes.")


def _make_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  name: str) -> ArrayDataset:
    """Infers labelled/unlabelled and num_classes from raw loader output."""
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers (-1 = unlabelled), got {labels.dtype}.")
    if labels.size == 0 or np.all(labels == -1):
        return ArrayDataset(images, labels, [], 0, name)
    if np.any(labels == -1):
        raise ValueError(f"{name}: labels mix -1 (unlabelled) with class ids; label every example "
                         "or none (all -1).")
    class_names = list(class_names) or [str(i) for i in range(int(labels.max()) + 1)]
    _check_label_range(labels, len(class_names), name)
    return ArrayDataset(images, labels, class_names, len(class_names), name)


def _subset(ds: ArrayDataset, indices: np.ndarray) -> ArrayDataset:
    return ArrayDataset(ds.images[indices], ds.labels[indices], ds.class_names, ds.num_classes,
                        ds.name)


def _apply_options(ds: ArrayDataset, options: _Options) -> ArrayDataset:
    """Applies fraction, then classes, then limit (see module docstring)."""
    if options.fraction is not None:
        n = len(ds)
        low, high = (round(f * n) for f in options.fraction)
        permutation = np.random.default_rng(options.fraction_seed).permutation(n)
        ds = _subset(ds, np.sort(permutation[low:high]))
    if options.classes is not None:
        if ds.num_classes == 0:
            raise ValueError(f"{ds.name}: classes= needs a labelled dataset, this one is unlabelled.")
        unknown = [c for c in options.classes if c >= ds.num_classes]
        if unknown:
            raise ValueError(f"{ds.name}: classes {unknown} do not exist; valid ids are "
                             f"0..{ds.num_classes - 1} ({ds.class_names}).")
        kept = np.flatnonzero(np.isin(ds.labels, options.classes))
        ds = _subset(ds, kept)
        if options.relabel:
            new_label = np.full(ds.num_classes, -1, np.int32)
            new_label[list(options.classes)] = np.arange(len(options.classes))
            ds = ArrayDataset(ds.images, new_label[ds.labels],
                              [ds.class_names[c] for c in options.classes], len(options.classes),
                              ds.name)
    if options.limit is not None:
        ds = _subset(ds, np.arange(min(options.limit, len(ds))))
    return ds


# ------------------------------------------------------------------------------------------------
# Image helpers (TF).
# ------------------------------------------------------------------------------------------------


def _to_rgb(images: tf.Tensor, channels: int) -> tf.Tensor:
    if channels == 1:
        return tf.image.grayscale_to_rgb(images)
    if channels == 4:
        return images[..., :3]
    if channels == 3:
        return images
    raise ValueError(f"Images must have 1, 3 or 4 channels, got {channels}.")


def _tf_resize_square(images: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [..., H, W, 3] -> uint8 [..., size, size, 3]; a no-op when already size x size.

    Shorter side to `size` (antialiased bilinear, so downscaling does not alias), then a centre crop.
    """
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]

    def resize():
        scale = size / tf.cast(tf.minimum(height, width), tf.float32)
        new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
        resized = tf.image.resize(images, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        cropped = resized[..., top:top + size, left:left + size, :]
        return tf.cast(tf.clip_by_value(tf.round(cropped), 0.0, 255.0), tf.uint8)

    out = tf.cond((height == size) & (width == size), lambda: images, resize)
    out.set_shape(images.shape[:-3].concatenate([size, size, 3]))
    return out


def _resize_numpy(images: np.ndarray, size: int, name: str) -> np.ndarray:
    """uint8 [N, H, W] / [N, H, W, 1|3|4] -> uint8 [N, size, size, 3]."""
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 (0..255), got {images.dtype}; convert with "
                         "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) if they are floats in [0, 1].")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: images must be [N, H, W, 3] (RGB) or [N, H, W] (grayscale), got "
                         f"shape {images.shape}.")
    if images.shape[1:] == (size, size, 3):
        return images
    out = [_tf_resize_square(_to_rgb(tf.constant(images[i:i + _RESIZE_CHUNK]), images.shape[-1]),
                             size).numpy()
           for i in range(0, len(images), _RESIZE_CHUNK)]
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _collect(dataset: tf.data.Dataset, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Materialises a tf.data stream of (uint8 [size,size,3], int label) pairs."""
    images, labels = [np.zeros((0, size, size, 3), np.uint8)], [np.zeros((0,), np.int64)]
    for image_batch, label_batch in dataset.batch(256).prefetch(2).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------------------------------
# Sources. Each returns (uint8 [N, size, size, 3], int labels [N], class_names).
# ------------------------------------------------------------------------------------------------

_Loaded = tuple[np.ndarray, np.ndarray, list[str]]


def _load_tfds(spec: DatasetSpec, *, image_size: int, seed: int, data_dir: str | None) -> _Loaded:
    del seed
    try:
        dataset, info = tfds.load(spec.name, split=spec.split, data_dir=data_dir, with_info=True,
                                  shuffle_files=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {spec.name!r} in spec {spec.raw!r}; see "
                         "https://www.tensorflow.org/datasets/catalog for names, e.g. "
                         "'tfds:cifar10:test' or 'tfds:svhn_cropped:test'.") from e
    except (ValueError, KeyError) as e:
        raise ValueError(f"Could not load {spec.raw!r} (check the split name and data_dir): {e}") from e
    features = info.features
    image_key = "image" if "image" in features else next(
        (k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    if image_key is None:
        raise ValueError(f"TFDS dataset {spec.name!r} has no image feature; features: "
                         f"{list(features.keys())}.")
    channels = features[image_key].shape[-1]
    label_feature = features["label"] if "label" in features else None
    class_names = list(getattr(label_feature, "names", None) or [])

    def convert(example):
        image = _tf_resize_square(_to_rgb(example[image_key], channels), image_size)
        label = tf.cast(example["label"], tf.int64) if label_feature is not None \
            else tf.constant(-1, tf.int64)
        return image, label

    images, labels = _collect(dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE), image_size)
    return images, labels, class_names


def _load_npz(spec: DatasetSpec, *, image_size: int, seed: int, data_dir: str | None) -> _Loaded:
    del seed, data_dir
    all_images, all_labels, class_names = [], [], None
    for path in spec.name.split("+"):
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"npz file {path!r} of spec {spec.raw!r} does not exist; give a path "
                                    "to an .npz with keys images and labels, e.g. "
                                    "'npz:/data/cifar10-test.npz'.")
        with tf.io.gfile.GFile(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            missing = {"images", "labels"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: missing keys {sorted(missing)} (has {data.files}); save with "
                                 "np.savez(path, images=uint8 [N,H,W,3], labels=int [N] (-1 = unlabelled), "
                                 "label_names=[...]).")
            images, labels = data["images"], data["labels"]
            names = [str(n) for n in data["label_names"]] if "label_names" in data.files else []
        if labels.shape != (len(images),):
            raise ValueError(f"{path}: labels must have shape [{len(images)}], got {labels.shape}.")
        all_images.append(_resize_numpy(images, image_size, path))
        all_labels.append(labels)
        if class_names is None:
            class_names = names
        elif names and class_names and names != class_names:
            raise ValueError(f"{spec.raw}: the npz files disagree on label_names ({class_names} vs "
                             f"{names}); only concatenate files of the same label space.")
        else:
            class_names = class_names or names
    return np.concatenate(all_images), np.concatenate(all_labels), class_names or []


def _load_folder(spec: DatasetSpec, *, image_size: int, seed: int, data_dir: str | None) -> _Loaded:
    del seed, data_dir
    root = os.path.join(spec.name, spec.split) if spec.split else spec.name
    layout = "PATH/SPLIT/<class>/*.png|jpg|jpeg (or PATH/<class>/... without SPLIT)"
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} of spec {spec.raw!r} does not exist; expected "
                                f"{layout}.")
    class_names = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                         if tf.io.gfile.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(root, class_name)
        files = sorted(f for f in tf.io.gfile.listdir(class_dir)
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"No .png/.jpg/.jpeg images under {root!r} (classes found: {class_names}); "
                         f"expected {layout}.")

    def decode(path, label):
        contents = tf.io.read_file(path)
        # decode_image uses libjpeg's fast, less accurate IDCT for JPEGs (off by up to ~6 levels);
        # the accurate one matches Pillow, which decoded the reference arrays in shared/data.
        image = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
        return _tf_resize_square(image, image_size), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int64)))
    images, labels = _collect(dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE), image_size)
    return images, labels, class_names


def _load_noise(spec: DatasetSpec, *, image_size: int, seed: int, data_dir: str | None) -> _Loaded:
    """Noise generated at image_size directly (resizing would blur it and change its statistics)."""
    del data_dir
    n = int(spec.split) if spec.split else DEFAULT_NOISE_EXAMPLES
    shape = (image_size, image_size, 3)
    images = np.empty((n,) + shape, np.uint8)
    for i in range(n):  # Per-index generator: image i does not depend on N.
        rng = np.random.default_rng([seed, i])
        values = rng.normal(0.5, 0.25, shape) if spec.name == "gaussian" else rng.uniform(0, 1, shape)
        images[i] = np.round(np.clip(values, 0.0, 1.0) * 255.0)
    return images, np.full(n, -1, np.int64), []


def _load_sklearn(spec: DatasetSpec, *, image_size: int, seed: int, data_dir: str | None) -> _Loaded:
    del data_dir
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    if spec.name == "digits":
        import sklearn.model_selection  # pylint: disable=g-import-not-at-top
        digits = sklearn.datasets.load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        indices = np.arange(len(images))
        if (spec.split or "all") != "all":
            train, test = sklearn.model_selection.train_test_split(
                indices, test_size=0.25, random_state=0, stratify=digits.target)
            indices = np.sort(train if spec.split == "train" else test)
        images = _resize_numpy(images[indices], image_size, spec.raw)
        return images, digits.target[indices], [str(i) for i in range(10)]
    n = int(spec.split) if spec.split else DEFAULT_PHOTO_PATCHES
    return _photo_patches(n, image_size, seed), np.full(n, -1, np.int64), []


def _photo_patches(n: int, size: int, seed: int) -> np.ndarray:
    """Square patches of log-uniform side at uniform positions; patch i depends only on (seed, i)."""
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    photos = sklearn.datasets.load_sample_images().images
    height = min(p.shape[0] for p in photos)
    width = min(p.shape[1] for p in photos)
    photos = np.stack([p[:height, :width, :3] for p in photos])
    min_side = min(size, height, width)
    max_side = max(min_side, min(height, width) // 2)
    boxes = np.empty((n, 4), np.int32)  # photo, top, left, side
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        photo = rng.integers(len(photos))
        side = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
        side = min(max(side, min_side), max_side)
        boxes[i] = photo, rng.integers(height - side + 1), rng.integers(width - side + 1), side
    photos_tensor = tf.constant(photos)

    def crop(box):
        patch = photos_tensor[box[0], box[1]:box[1] + box[3], box[2]:box[2] + box[3]]
        return _tf_resize_square(patch, size), tf.constant(-1, tf.int64)

    dataset = tf.data.Dataset.from_tensor_slices(boxes).map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    return _collect(dataset, size)[0]


_LOADERS: dict[str, Callable[..., _Loaded]] = {
    "tfds": _load_tfds, "npz": _load_npz, "folder": _load_folder, "noise": _load_noise,
    "sklearn": _load_sklearn,
}


def load_arrays(spec: str, *, image_size: int = 32, seed: int = 0,
                data_dir: str | None = None) -> ArrayDataset:
    """Materialises any spec in host memory as uint8 [N, image_size, image_size, 3] + int32 labels.

    `seed` only affects generated sources (noise, sklearn:photos); `data_dir` only TFDS (None = the
    TFDS default / $TFDS_DATA_DIR). Options are applied after loading; an empty result is an error.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    parsed = parse_spec(spec)
    images, labels, class_names = _LOADERS[parsed.kind](
        parsed, image_size=int(image_size), seed=int(seed), data_dir=data_dir)
    ds = _make_dataset(images, labels, class_names, parsed.raw)
    ds = _apply_options(ds, _typed_options(parsed.options, parsed.raw))
    if len(ds) == 0:
        raise ValueError(f"Spec {parsed.raw!r} selects no examples; check its options and source.")
    return ds


class UnionPart(NamedTuple):
    """Where one dataset of a union sits in the union's label space."""
    spec: str
    first_class: int
    num_classes: int
    class_names: list[str]


def load_union(specs: Sequence[str], *, image_size: int = 32, seed: int = 0,
               data_dir: str | None = None) -> tuple[ArrayDataset, list[UnionPart]]:
    """Concatenates datasets into one label space (for the CLP ensemble).

    A labelled dataset's labels are offset by the number of classes before it; an unlabelled one
    (e.g. noise, Tiny ImageNet test) becomes ONE class named after its spec.
    """
    if isinstance(specs, str) or not specs:
        raise ValueError(f"load_union needs a non-empty list of spec strings, got {specs!r}.")
    images, labels, class_names, parts = [], [], [], []
    for spec in specs:
        ds = load_arrays(spec, image_size=image_size, seed=seed, data_dir=data_dir)
        first = len(class_names)
        names = ds.class_names if ds.num_classes else [ds.name]
        parts.append(UnionPart(ds.name, first, len(names), list(names)))
        images.append(ds.images)
        labels.append(ds.labels + first if ds.num_classes else np.full(len(ds), first, np.int32))
        class_names.extend(names)
    union = ArrayDataset(np.concatenate(images), np.concatenate(labels), class_names,
                         len(class_names), "union(" + ", ".join(p.spec for p in parts) + ")")
    return union, parts


# ------------------------------------------------------------------------------------------------
# Batching.
# ------------------------------------------------------------------------------------------------


def _process_layout(global_batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
    """-> (process_index, process_count, local_batch_size) with checks."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"Need 0 <= process_index < process_count, got {process_index} and "
                         f"{process_count}.")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}; pick e.g. "
                         f"{max(1, round(global_batch_size / process_count)) * process_count}.")
    return process_index, process_count, global_batch_size // process_count


def _epoch_indices(num_examples: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Maps global stream positions to example indices: epoch e is a permutation from (seed, e)."""

    @functools.lru_cache(maxsize=4)
    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(num_examples)

    def indices(positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = permutation(int(epoch))[offsets[at]]
        return out

    return indices


def _uniform_class_indices(labels: np.ndarray, seed: int,
                           global_batch_size: int) -> Callable[[int], np.ndarray]:
    """Global batch of a step: a class uniformly (among classes present), then an example in it."""
    order = np.argsort(labels, kind="stable")
    present, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    del present

    def indices(step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        classes = rng.integers(len(counts), size=global_batch_size)
        within = rng.integers(0, counts[classes])
        return order[starts[classes] + within]

    return indices


def _prefetch(produce: Callable[[int], Any], steps: Iterable[int], buffer_size: int) -> Iterator[Any]:
    """Runs produce(step) in a daemon thread, `buffer_size` items ahead of the consumer.

    The thread stops when the consumer's generator is closed or garbage collected; errors in the
    thread re-raise in the consumer.
    """
    if buffer_size <= 0:
        yield from map(produce, steps)
        return
    buffer: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for step in steps:
                if not put((True, produce(step))):
                    return
        except BaseException as e:  # pylint: disable=broad-except
            put((False, e))

    thread = threading.Thread(target=work, daemon=True, name="train_batches_prefetch")
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()


def train_batches(ds: ArrayDataset, *, global_batch_size: int, seed: int, start_step: int = 0,
                  sampling: str = "epoch", process_index: int | None = None,
                  process_count: int | None = None,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this host's batches {"image": uint8 [B/P,S,S,3], "label": int32 [B/P]}.

    Batch `step` is a pure function of (seed, step), so resuming at `start_step` reproduces an
    uninterrupted run from that step on without replaying skipped steps. Host p takes the p-th
    contiguous slice of each global batch, so concatenating hosts' batches gives the global batch.

    sampling="epoch": the index stream is epoch permutations (epoch e from default_rng([seed, e]))
      back to back; every example is seen once per epoch; batches may straddle epochs.
    sampling="uniform_class": per step (default_rng([seed, step])) each slot draws a class uniformly
      among the classes present, then an example uniformly within it (class-balanced, for CLP).
    """
    process_index, _, local_batch_size = _process_layout(global_batch_size, process_index,
                                                         process_count)
    if len(ds) == 0:
        raise ValueError(f"{ds.name}: cannot draw training batches from an empty dataset.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    host_slice = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    if sampling == "epoch":
        epoch_indices = _epoch_indices(len(ds), int(seed))
        host_offsets = np.arange(host_slice.start, host_slice.stop, dtype=np.int64)

        def batch_indices(step: int) -> np.ndarray:
            return epoch_indices(step * global_batch_size + host_offsets)
    elif sampling == "uniform_class":
        if ds.num_classes == 0:
            raise ValueError(f"{ds.name}: sampling='uniform_class' needs labels; use sampling='epoch' for "
                             "an unlabelled dataset.")
        class_indices = _uniform_class_indices(ds.labels, int(seed), global_batch_size)

        def batch_indices(step: int) -> np.ndarray:
            return class_indices(step)[host_slice]
    else:
        raise ValueError(f"Unknown sampling {sampling!r}; valid: {', '.join(SAMPLING_MODES)}.")

    def make_batch(step: int) -> dict[str, np.ndarray]:
        indices = batch_indices(step)
        return {"image": ds.images[indices], "label": ds.labels[indices]}

    return _prefetch(make_batch, itertools.count(start_step), prefetch)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalStream:
    """Re-iterable, padded evaluation batches of one host.

    Global batch k covers examples [k*B, (k+1)*B); host p gets its p-th contiguous slice of B/P
    positions. Positions past the end are padding (zero image, label -1, index -1, mask False), so
    every example is seen exactly once over all hosts and every host yields `num_batches` batches.
    """
    dataset: ArrayDataset
    global_batch_size: int
    process_index: int
    process_count: int

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    @property
    def num_batches(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n, size = self.num_examples, self.local_batch_size
        images, labels = self.dataset.images, self.dataset.labels
        for k in range(self.num_batches):
            start = k * self.global_batch_size + self.process_index * size
            index = np.arange(start, start + size, dtype=np.int64)
            mask = index < n
            real = index[mask]
            image = np.zeros((size,) + images.shape[1:], np.uint8)
            image[mask] = images[real]
            label = np.full(size, -1, np.int32)
            label[mask] = labels[real]
            yield {"image": image, "label": label, "mask": mask,
                   "index": np.where(mask, index, -1).astype(np.int32)}


def eval_batches(source: str | ArrayDataset, *, global_batch_size: int, image_size: int = 32,
                 process_index: int | None = None, process_count: int | None = None,
                 data_dir: str | None = None, seed: int = 0) -> EvalStream:
    """Padded, masked evaluation batches of a spec or ArrayDataset (image_size etc. only for specs).

    Sources are materialised in host memory (TFDS splits too; no streaming).
    """
    process_index, process_count, _ = _process_layout(global_batch_size, process_index,
                                                      process_count)
    if isinstance(source, str):
        source = load_arrays(source, image_size=image_size, seed=seed, data_dir=data_dir)
    elif not isinstance(source, ArrayDataset):
        raise ValueError(f"eval_batches needs a spec string or an ArrayDataset, got {type(source)}.")
    return EvalStream(source, global_batch_size, process_index, process_count)
