"""Datasets: spec strings (`specs`), random-access sources (`sources`), batches (`pipeline`).

`load(spec)` gives a Source; `pipeline.train_batches` and `pipeline.eval_batches` turn sources into
per-host batches. Only `tfds_source` imports TensorFlow, and only when a `tfds:` spec is loaded.
"""
from contrastood.data.sources import Source, Union, UnionPart, load, load_union
from contrastood.data.specs import parse_classes, parse_spec

__all__ = ["Source", "Union", "UnionPart", "load", "load_union", "parse_classes", "parse_spec"]
