"""TFDS datasets as random-access sources: the one module of the package that imports TensorFlow.

A split prepared as ArrayRecord (`launch/prepare_tfds.py` does that) is read with `tfds.data_source`:
example i is one record read from disk when a batch needs it, its image kept encoded until a decode
worker (Pillow) turns it into pixels. A split prepared as TFRecord (the TFDS default) cannot be read
at random, so its encoded images are read once into host memory (a warning says so); that is fine for
CIFAR-sized sets and a reason to prepare large ones as ArrayRecord.

Nothing here downloads: a dataset that is not prepared fails in seconds and leaves no directories.
"""
from __future__ import annotations

import difflib
import logging
import os

import numpy as np

from contrastood import errors
from contrastood.data import images as images_lib
from contrastood.data import sources as sources_lib
from contrastood.data import specs as specs_lib

_LABEL_CHUNK = 4096

try:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_datasets as tfds
except ImportError as import_error:  # pragma: no cover - exercised by the TF-free subprocess test
    tf = tfds = None
    _IMPORT_ERROR = import_error
else:
    _IMPORT_ERROR = None
    try:  # TF must never take accelerator memory that JAX needs.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass


def _require_tfds(spec: str) -> None:
    if tfds is None:
        raise errors.MissingDependencyError(
            f"spec {spec!r} needs tensorflow-datasets, which cannot be imported here ({_IMPORT_ERROR}); install it "
            "with `pip install tensorflow-cpu tensorflow-datasets`, or convert the data to npz/npy "
            "(`python -m contrastood.data.convert`) and use an 'npz:' or 'npy:' spec")


class TfdsSource(sources_lib.Source):
    """Records of a TFDS split; images decoded per index (records may hold encoded bytes or arrays)."""

    def __init__(self, records, labels: np.ndarray, class_names: list[str], image_key: str, name: str,
                 identity: str):
        self.records = records
        self.labels, self.class_names = sources_lib.check_labels(labels, class_names, name)
        self.image_key = image_key
        self.name = name
        self._identity = identity

    def image(self, index: int) -> np.ndarray:
        value = self.records[index]
        value = value[self.image_key] if isinstance(value, dict) else value
        if isinstance(value, (bytes, np.bytes_)):
            return images_lib.decode(bytes(value), f"{self.name}[{index}]")
        return images_lib.as_rgb(np.asarray(value), f"{self.name}[{index}]")

    def fingerprint(self) -> str:
        return self._identity


def load(spec: specs_lib.DatasetSpec, *, data_dir: str | None) -> TfdsSource:
    _require_tfds(spec.raw)
    try:
        builder = tfds.builder(spec.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(spec.name.split(":")[0], tfds.list_builders(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise errors.DataError(f"unknown TFDS dataset {spec.name!r} in spec {spec.raw!r}{hint}; see "
                               "https://www.tensorflow.org/datasets/catalog") from None
    if not builder.is_prepared():
        raise errors.DataError(
            f"TFDS dataset {spec.name!r} is not prepared in {builder.data_dir} (nothing is downloaded here). Prepare it "
            "once with `python launch/prepare_tfds.py --datasets=NAME --data_dir=DIR`, then point "
            "--config.data.data_dir (or $TFDS_DATA_DIR) at DIR; or convert the data to an 'npz:' spec")
    info = builder.info
    if spec.split not in info.splits:
        base = spec.split.split("[")[0]
        if base not in info.splits:
            raise errors.DataError(f"TFDS dataset {spec.name!r} has no split {spec.split!r}; splits: "
                                   f"{sorted(info.splits.keys())}")
    features = info.features
    image_key = "image" if "image" in features else next(
        (k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    if image_key is None:
        raise errors.DataError(f"TFDS dataset {spec.name!r} has no image feature; features: {list(features.keys())}")
    label_feature = features["label"] if "label" in features else None
    class_names = list(getattr(label_feature, "names", None) or [])
    decoders = {image_key: tfds.decode.SkipDecoding()}
    identity = sources_lib._digest("tfds", spec.name, info.version, spec.split, builder.data_dir,
                                   info.splits[spec.split].num_examples)
    try:
        records = builder.as_data_source(split=spec.split, decoders=decoders)
    except (NotImplementedError, ValueError, KeyError) as error:
        logging.warning("%s: not prepared as ArrayRecord (%s); reading its encoded images into memory. Prepare it "
                        "with launch/prepare_tfds.py (file_format=array_record) to stream it from disk instead",
                        spec.raw, str(error).splitlines()[0][:120])
        records, labels = _read_all(builder, spec.split, decoders, image_key, label_feature is not None)
        return TfdsSource(records, labels, class_names, image_key, spec.raw, identity)
    labels = _labels(records, len(records), label_feature is not None)
    return TfdsSource(records, labels, class_names, image_key, spec.raw, identity)


def _labels(records, count: int, labelled: bool) -> np.ndarray:
    if not labelled:
        return np.full(count, -1, np.int32)
    labels = np.empty(count, np.int32)
    for start in range(0, count, _LABEL_CHUNK):
        chunk = range(start, min(start + _LABEL_CHUNK, count))
        batch = records.__getitems__(list(chunk)) if hasattr(records, "__getitems__") else [records[i] for i in chunk]
        labels[start:start + len(batch)] = [int(r["label"]) for r in batch]
    return labels


def _read_all(builder, split: str, decoders, image_key: str, labelled: bool):
    dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    images, labels = [], []
    for example in dataset.as_numpy_iterator():
        images.append(example[image_key])
        labels.append(int(example["label"]) if labelled else -1)
    return images, np.asarray(labels, np.int32)
