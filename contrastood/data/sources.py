"""Random-access datasets: `len(source)`, `source[i] -> {"image", "label"}`, labels up front.

A Source holds what it needs to find example i (an array, a memory map, a list of file names, a TFDS
ArrayRecord reader), never a decoded copy of a large split, so host memory does not grow with the
number of images and a restart decodes nothing in advance. Options (`#classes`, `#fraction`,
`#limit`) and the CLP union are index views over other sources.

Every source knows:
  labels        int32 [N] (-1 for every example of an unlabelled set); read at construction, cheap.
  class_names   one name per class (empty for an unlabelled set); num_classes = len(class_names).
  image_shape   (H, W) when every image has that size (array sources), else None (files, TFDS).
  fingerprint() a content identity for caches: a hash of the data, or for large file sets size,
                mtime and a sampled content hash. Features cached under one fingerprint are never
                reused for another.
  fetch(indices, size, pool)  uint8 [n, size, size, 3]: the images resized to size (shorter side, then
                a centre crop); array sources at that size are one gather.
"""
from __future__ import annotations

import abc
import concurrent.futures
import functools
import hashlib
import json
import logging
import math
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
from etils import epath

from contrastood import errors, workdir
from contrastood.data import images as images_lib
from contrastood.data import specs as specs_lib

_FINGERPRINT_SAMPLES = 64  # files (or byte ranges) hashed to fingerprint a large source
_HASH_ALL_BELOW = 256 << 20  # arrays up to this size are hashed whole


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, (bytes, memoryview)) else str(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


class Source(abc.ABC):
    """Base class; subclasses set name, labels, class_names and implement image() and fingerprint()."""

    name: str
    labels: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image(int(index)), "label": int(self.labels[index])}

    @abc.abstractmethod
    def image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] at the source's own size."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Identity of the content (see the module docstring)."""

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] of a fixed-shape source (one gather for arrays)."""
        if self.image_shape is None:
            raise ValueError(f"{self.name}: images() needs a source of one image size; use fetch()")
        if len(indices) == 0:
            return np.zeros((0, *self.image_shape, 3), np.uint8)
        return np.stack([self.image(int(i)) for i in indices])

    def fetch(self, indices: np.ndarray, size: int, pool: concurrent.futures.Executor | None = None) -> np.ndarray:
        """uint8 [n, size, size, 3]: each image resized (shorter side) and centre-cropped to size."""
        indices = np.asarray(indices, np.int64)
        if self.image_shape == (size, size):
            return self.images(indices)

        def one(i):
            return images_lib.resize_square(self.image(int(i)), size)

        return _stack(list(_map(pool, one, indices)), size)

    def describe(self) -> str:
        kind = "unlabelled" if not self.num_classes else f"{self.num_classes} classes"
        shape = f"{self.image_shape[0]}x{self.image_shape[1]}" if self.image_shape else "images of their own size"
        return f"{self.name}: {len(self)} examples, {kind}, {shape}"


def _map(pool, fn, items):
    return map(fn, items) if pool is None or len(items) < 2 else pool.map(fn, items)


def _stack(arrays: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def check_labels(labels, class_names: Sequence[str], name: str) -> tuple[np.ndarray, list[str]]:
    """Validates raw labels; infers class names 0..max when none are given. -1 only for unlabelled sets."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise errors.DataError(f"{name}: labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise errors.DataError(f"{name}: labels must be integers (-1 = unlabelled), got {labels.dtype}")
    labels = labels.astype(np.int32, copy=False)
    if labels.size == 0 or np.all(labels == -1):
        return labels, []
    if np.any(labels == -1):
        raise errors.DataError(f"{name}: labels mix -1 (unlabelled) with class ids; label every example or none "
                               "(all -1)")
    class_names = [str(n) for n in class_names] or [str(i) for i in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        bad = sorted(set(labels[(labels < 0) | (labels >= len(class_names))].tolist()))[:5]
        raise errors.DataError(f"{name}: labels must lie in [0, {len(class_names)}) for a labelled dataset, found "
                               f"{bad}. Use -1 for every example of an unlabelled set, and give label_names "
                               "covering all classes")
    return labels, class_names


# ------------------------------------------------------------------------------------------ arrays


class ArraySource(Source):
    """Images in a numpy array (in memory, or a read-only memory map): batches are one gather."""

    def __init__(self, images: np.ndarray, labels, class_names: Sequence[str], name: str,
                 fingerprint: Callable[[], str] | str | None = None):
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise errors.DataError(f"{name}: images must be a uint8 numpy array [N, H, W, 3] (or [N, H, W]), got "
                                   f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}; "
                                   "convert floats in [0, 1] with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
            raise errors.DataError(f"{name}: images must be [N, H, W, 3] (RGB) or [N, H, W] (grayscale), got shape "
                                   f"{images.shape}")
        self.labels, self.class_names = check_labels(labels, class_names, name)
        if len(self.labels) != len(images):
            raise errors.DataError(f"{name}: labels must have shape [{len(images)}], got [{len(self.labels)}]")
        self.array = images
        self.name = name
        self.image_shape = tuple(int(s) for s in images.shape[1:3])
        self._fingerprint = fingerprint

    def _rgb(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim == 3:
            batch = batch[..., None]
        if batch.shape[-1] == 1:
            return np.repeat(batch, 3, axis=-1)
        return np.ascontiguousarray(batch[..., :3]) if batch.shape[-1] == 4 else batch

    def image(self, index: int) -> np.ndarray:
        return self._rgb(self.array[index][None])[0]

    def images(self, indices: np.ndarray) -> np.ndarray:
        # Fancy indexing of a memory map reads only these rows; sorted reads are kinder to the disk.
        indices = np.asarray(indices, np.int64)
        return self._rgb(np.asarray(self.array[indices]))

    def fingerprint(self) -> str:
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        if self._fingerprint is None:
            self._fingerprint = _array_digest(self.array, self.labels)
        return self._fingerprint


def _array_digest(array: np.ndarray, labels: np.ndarray) -> str:
    """The whole array up to _HASH_ALL_BELOW bytes, else its shape plus evenly spaced rows."""
    flat = array.reshape(len(array), -1) if len(array) else array
    if array.nbytes <= _HASH_ALL_BELOW:
        return _digest("array", array.shape, array.dtype, memoryview(np.ascontiguousarray(flat)).cast("B"),
                       labels.tobytes())
    rows = np.unique(np.linspace(0, len(array) - 1, 4 * _FINGERPRINT_SAMPLES).astype(np.int64))
    return _digest("array-sampled", array.shape, array.dtype, np.ascontiguousarray(flat[rows]).tobytes(),
                   labels.tobytes())


def _file_digest(path: epath.Path) -> str:
    """size + mtime + a hash of evenly spaced 64 KiB ranges (the whole file when small)."""
    stat = path.stat()
    size = int(stat.length if hasattr(stat, "length") else stat.st_size)
    mtime = getattr(stat, "mtime", None) or getattr(stat, "st_mtime", None)
    chunk = 1 << 16
    with path.open("rb") as f:
        if size <= _FINGERPRINT_SAMPLES * chunk:
            content = _digest(f.read())
        else:
            pieces = []
            for offset in np.linspace(0, size - chunk, _FINGERPRINT_SAMPLES).astype(np.int64):
                f.seek(int(offset))
                pieces.append(f.read(chunk))
            content = _digest(*pieces)
    return _digest("file", os.fspath(path), size, mtime, content)


def load_npz(spec: specs_lib.DatasetSpec) -> ArraySource:
    all_images, all_labels, class_names, digests = [], [], None, []
    for name in spec.name.split("+"):
        path = workdir.as_path(name)
        if not path.exists():
            raise errors.DataError(f"npz file {name!r} of spec {spec.raw!r} does not exist; give a path to an .npz with "
                                   "keys images and labels, e.g. 'npz:/data/cifar10-test.npz'")
        digests.append(_file_digest(path))
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            missing = {"images", "labels"} - set(data.files)
            if missing:
                raise errors.DataError(f"{name}: missing keys {sorted(missing)} (has {data.files}); save with "
                                       "np.savez(path, images=uint8 [N,H,W,3], labels=int [N] (-1 = unlabelled), "
                                       "label_names=[...])")
            images, labels = data["images"], data["labels"]
            names = [str(n) for n in data["label_names"]] if "label_names" in data.files else []
        if labels.shape != (len(images),):
            raise errors.DataError(f"{name}: labels must have shape [{len(images)}], got {labels.shape}")
        if all_images and images.shape[1:] != all_images[0].shape[1:]:
            raise errors.DataError(f"{spec.raw}: the npz files hold images of different shapes ({all_images[0].shape[1:]} "
                                   f"vs {images.shape[1:]}); concatenate files of one image size")
        all_images.append(images)
        all_labels.append(labels)
        if class_names is None:
            class_names = names
        elif names and class_names and names != class_names:
            raise errors.DataError(f"{spec.raw}: the npz files disagree on label_names ({class_names} vs {names}); only "
                                   "concatenate files of the same label space")
        else:
            class_names = class_names or names
    images = all_images[0] if len(all_images) == 1 else np.concatenate(all_images)
    labels = np.concatenate(all_labels)
    return ArraySource(images, labels, class_names or [], spec.raw, fingerprint=_digest("npz", *digests))


def npy_paths(prefix: str) -> tuple[epath.Path, epath.Path, epath.Path]:
    return tuple(workdir.as_path(f"{prefix}.{suffix}") for suffix in ("images.npy", "labels.npy", "label_names.json"))


def load_npy(spec: specs_lib.DatasetSpec) -> ArraySource:
    """Memory-mapped .npy files (local); a URL is read into memory (object stores cannot be mapped)."""
    images_path, labels_path, names_path = npy_paths(spec.name)
    for path in (images_path, labels_path):
        if not path.exists():
            raise errors.DataError(f"{path} of spec {spec.raw!r} does not exist; npy:PREFIX needs PREFIX.images.npy and "
                                   "PREFIX.labels.npy (write them with `python -m contrastood.data.convert IN.npz PREFIX`)")
    if workdir.is_url(spec.name):
        with images_path.open("rb") as f:
            images = np.load(f, allow_pickle=False)
    else:
        images = np.load(os.fspath(images_path), mmap_mode="r", allow_pickle=False)
    with labels_path.open("rb") as f:
        labels = np.load(f, allow_pickle=False)
    names = json.loads(names_path.read_text()) if names_path.exists() else []
    fingerprint = lambda: _digest("npy", _file_digest(images_path), _file_digest(labels_path))  # noqa: E731
    return ArraySource(images, labels, names, spec.raw, fingerprint=fingerprint)


# ------------------------------------------------------------------------------------- generated


class NoiseSource(Source):
    """Per-pixel Gaussian N(0.5, 0.25^2) or uniform noise clipped to [0, 1], generated at `size`
    (resizing would blur it and change its statistics); image i depends only on (seed, i)."""

    def __init__(self, kind: str, count: int, size: int, seed: int, name: str):
        self.kind, self.size, self.seed, self.name = kind, size, seed, name
        self.labels = np.full(count, -1, np.int32)
        self.class_names = []
        self.image_shape = (size, size)

    def image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        shape = (self.size, self.size, 3)
        values = rng.normal(0.5, 0.25, shape) if self.kind == "gaussian" else rng.uniform(0, 1, shape)
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)

    def fetch(self, indices, size, pool=None):
        if size != self.size:  # noise is generated at its size, never resized
            raise ValueError(f"{self.name}: generated at {self.size} px, asked for {size}")
        return super().fetch(indices, size, pool)

    def fingerprint(self) -> str:
        return _digest("noise-v1", self.kind, len(self), self.size, self.seed)


def load_digits(spec: specs_lib.DatasetSpec) -> ArraySource:
    import sklearn.datasets
    import sklearn.model_selection

    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, at their own size
    indices = np.arange(len(images))
    if (spec.split or "all") != "all":
        train, test = sklearn.model_selection.train_test_split(indices, test_size=0.25, random_state=0,
                                                               stratify=digits.target)
        indices = np.sort(train if spec.split == "train" else test)
    return ArraySource(images[indices], digits.target[indices], [str(i) for i in range(10)], spec.raw,
                       fingerprint=_digest("sklearn-digits-v1", spec.split or "all"))


class PhotoPatches(Source):
    """Square patches of log-uniform side at uniform positions of scikit-learn's two sample photos,
    at their own size; patch i depends only on (seed, i)."""

    def __init__(self, count: int, size: int, seed: int, name: str):
        import sklearn.datasets

        photos = sklearn.datasets.load_sample_images().images
        height = min(p.shape[0] for p in photos)
        width = min(p.shape[1] for p in photos)
        self.photos = np.stack([p[:height, :width, :3] for p in photos])
        min_side = min(size, height, width)
        max_side = max(min_side, min(height, width) // 2)
        self.boxes = np.empty((count, 4), np.int32)  # photo, top, left, side
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            photo = rng.integers(len(self.photos))
            side = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
            side = min(max(side, min_side), max_side)
            self.boxes[i] = photo, rng.integers(height - side + 1), rng.integers(width - side + 1), side
        self.labels = np.full(count, -1, np.int32)
        self.class_names = []
        self.name = name
        self.seed, self.size = seed, size

    def image(self, index: int) -> np.ndarray:
        photo, top, left, side = (int(v) for v in self.boxes[index])
        return self.photos[photo, top:top + side, left:left + side]

    def fingerprint(self) -> str:
        return _digest("sklearn-photos-v1", len(self), self.size, self.seed)


# ----------------------------------------------------------------------------------------- folders


class FolderSource(Source):
    """ROOT/<class>/<image>: file names listed once, each image read and decoded when asked for."""

    def __init__(self, root: epath.Path, name: str):
        layout = "PATH/SPLIT/<class>/<image> (or PATH/<class>/<image> without SPLIT)"
        if not root.is_dir():
            raise errors.DataError(f"image folder {root} of spec {name!r} does not exist; expected {layout}")
        class_dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
        if not class_dirs:
            raise errors.DataError(f"image folder {root} has no class folders; expected {layout}")
        paths, labels, skipped = [], [], []
        for label, class_dir in enumerate(class_dirs):
            files = sorted((p for p in class_dir.iterdir() if not p.is_dir()), key=lambda p: p.name)
            kept = [p for p in files if p.suffix.lower() in images_lib.EXTENSIONS]
            skipped.extend(p for p in files if p.suffix.lower() not in images_lib.EXTENSIONS)
            if not kept:
                raise errors.DataError(
                    f"class folder {class_dir} has no images ({', '.join(images_lib.EXTENSIONS)}); an empty class "
                    "would shift every later label: remove the folder or add its images")
            paths.extend(kept)
            labels.extend([label] * len(kept))
        if skipped:
            logging.warning("%s: skipped %d files that are not images (extensions other than %s), e.g. %s", name,
                            len(skipped), ", ".join(images_lib.EXTENSIONS), ", ".join(os.fspath(p) for p in skipped[:3]))
        self.root, self.name = root, name
        self.paths = [os.fspath(p) for p in paths]
        self.labels = np.asarray(labels, np.int32)
        self.class_names = [p.name for p in class_dirs]

    def image(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            data = epath.Path(path).read_bytes()
        except OSError as error:
            raise errors.DataError(f"cannot read image {path} ({error})") from None
        return images_lib.decode(data, path)

    def fingerprint(self) -> str:
        rows = np.unique(np.linspace(0, len(self.paths) - 1, _FINGERPRINT_SAMPLES).astype(np.int64))
        sampled = [_file_digest(epath.Path(self.paths[i])) for i in rows]
        return _digest("folder", os.fspath(self.root), len(self.paths), _digest(*self.paths), self.labels.tobytes(),
                       *sampled)


def load_folder(spec: specs_lib.DatasetSpec) -> FolderSource:
    root = workdir.as_path(spec.name)
    if spec.split:
        root = root / spec.split
    return FolderSource(root, spec.raw)


# ------------------------------------------------------------------------------------------- views


class View(Source):
    """A subset of another source (kept in the given order), optionally relabelled."""

    def __init__(self, base: Source, indices: np.ndarray, name: str, *, label_map: np.ndarray | None = None,
                 class_names: Sequence[str] | None = None):
        self.base = base
        self.indices = np.asarray(indices, np.int64)
        self.name = name
        labels = base.labels[self.indices]
        self.labels = label_map[labels] if label_map is not None else labels
        self.class_names = list(class_names) if class_names is not None else list(base.class_names)
        self.image_shape = base.image_shape
        self._label_map = label_map

    def image(self, index: int) -> np.ndarray:
        return self.base.image(int(self.indices[index]))

    def images(self, indices):
        return self.base.images(self.indices[np.asarray(indices, np.int64)])

    def fetch(self, indices, size, pool=None):
        return self.base.fetch(self.indices[np.asarray(indices, np.int64)], size, pool)

    def fingerprint(self) -> str:
        mapping = b"" if self._label_map is None else self._label_map.tobytes()
        return _digest("view", self.base.fingerprint(), self.indices.tobytes(), mapping, *self.class_names)


def apply_options(source: Source, options: specs_lib.Options) -> Source:
    """fraction, then classes, then limit, each an index view (see specs)."""
    name = source.name
    if options.fraction is not None:
        n = len(source)
        low, high = (round(f * n) for f in options.fraction)
        permutation = np.random.default_rng(options.fraction_seed).permutation(n)
        source = View(source, np.sort(permutation[low:high]), name)
    if options.classes is not None:
        if source.num_classes == 0:
            raise errors.DataError(f"{name}: classes= needs a labelled dataset, this one is unlabelled")
        unknown = [c for c in options.classes if c >= source.num_classes]
        if unknown:
            raise errors.DataError(f"{name}: classes {unknown} do not exist; valid ids are 0..{source.num_classes - 1} "
                                   f"({source.class_names})")
        kept = np.flatnonzero(np.isin(source.labels, options.classes))
        if options.relabel:
            label_map = np.full(source.num_classes, -1, np.int32)
            label_map[list(options.classes)] = np.arange(len(options.classes))
            source = View(source, kept, name, label_map=label_map,
                          class_names=[source.class_names[c] for c in options.classes])
        else:
            source = View(source, kept, name)
    if options.limit is not None:
        source = View(source, np.arange(min(options.limit, len(source))), name)
    return source


class UnionPart(NamedTuple):
    """Where one dataset of a union sits in the union's label space."""
    spec: str
    first_class: int
    num_classes: int
    class_names: list[str]


class Union(Source):
    """Sources concatenated into one label space (the CLP ensemble's training and test sets).

    A labelled part's labels are offset by the classes before it; an unlabelled part (noise, Tiny
    ImageNet test) becomes ONE class named after its spec.
    """

    def __init__(self, parts: Sequence[Source]):
        if not parts:
            raise errors.DataError("a union needs at least one dataset")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        labels, class_names, self.layout = [], [], []
        for part in parts:
            first = len(class_names)
            names = part.class_names if part.num_classes else [part.name]
            self.layout.append(UnionPart(part.name, first, len(names), list(names)))
            labels.append(part.labels + first if part.num_classes else np.full(len(part), first, np.int32))
            class_names.extend(names)
        self.labels = np.concatenate(labels).astype(np.int32)
        self.class_names = class_names
        self.name = "union(" + ", ".join(p.name for p in parts) + ")"
        shapes = {p.image_shape for p in parts}
        self.image_shape = shapes.pop() if len(shapes) == 1 else None

    def _split(self, indices: np.ndarray):
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(part_of):
            at = np.flatnonzero(part_of == k)
            yield at, self.parts[k], indices[at] - self.offsets[k]

    def image(self, index: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[k].image(int(index - self.offsets[k]))

    def images(self, indices):
        return self._gather(np.asarray(indices, np.int64), lambda part, local: part.images(local),
                            self.image_shape)

    def fetch(self, indices, size, pool=None):
        return self._gather(np.asarray(indices, np.int64), lambda part, local: part.fetch(local, size, pool),
                            (size, size))

    def _gather(self, indices, get, shape):
        out = np.empty((len(indices), *shape, 3), np.uint8)
        for at, part, local in self._split(indices):
            out[at] = get(part, local)
        return out

    def fingerprint(self) -> str:
        return _digest("union", *(p.fingerprint() for p in self.parts))


# ------------------------------------------------------------------------------------------ loading


def load(spec: str, *, image_size: int = 32, seed: int = 0, data_dir: str | None = None) -> Source:
    """The Source a spec names, with its options applied; DataError naming the fix on anything wrong.

    `image_size` only sizes generated sources (noise, photo patches); `seed` only affects generated
    sources; `data_dir` only TFDS (None = the TFDS default / $TFDS_DATA_DIR).
    """
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise errors.DataError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise errors.DataError(f"seed must be a non-negative int, got {seed!r}")
    parsed = specs_lib.parse_spec(spec)
    if parsed.kind == "npz":
        source: Source = load_npz(parsed)
    elif parsed.kind == "npy":
        source = load_npy(parsed)
    elif parsed.kind == "folder":
        source = load_folder(parsed)
    elif parsed.kind == "noise":
        source = NoiseSource(parsed.name, parsed.count or specs_lib.DEFAULT_NOISE_EXAMPLES, int(image_size),
                             int(seed), parsed.raw)
    elif parsed.kind == "sklearn":
        source = (load_digits(parsed) if parsed.name == "digits" else
                  PhotoPatches(parsed.count or specs_lib.DEFAULT_PHOTO_PATCHES, int(image_size), int(seed), parsed.raw))
    else:
        from contrastood.data import tfds_source  # the one module that imports TensorFlow

        source = tfds_source.load(parsed, data_dir=data_dir)
    source = apply_options(source, parsed.options)
    if len(source) == 0:
        raise errors.DataError(f"spec {parsed.raw!r} selects no examples; check its options and source")
    return source


def load_union(specs: Sequence[str], **kwargs) -> Union:
    if isinstance(specs, str) or not specs:
        raise errors.DataError(f"a union needs a non-empty list of spec strings, got {specs!r}")
    return Union([load(spec, **kwargs) for spec in specs])


@functools.lru_cache(maxsize=None)
def thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per size for the whole process (decoding releases the GIL, so threads scale)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
