"""The scorer plug-in surface: a scorer is one class in one module of this package, registered by name.

    @register
    class MyScorer(Scorer):
        name = "my_scorer"
        needs = ("logits",)                      # feature arrays score() reads
        def fit(self, train, ctx): ...           # train: the training split's features (+ "labels")
        def score(self, fitted, features, ctx):  # -> (scores [N], predicted class [N] or None)

Every module of this package is imported on first use, so a new file is all a new scorer needs; the
config validates `ood.scorers` against REGISTRY, feature extraction computes what the configured
scorers need, and evaluation loops over them (one failing scorer is reported and the others run).

Features: `pre_logits` [N, d] (the penultimate layer, f(x)), `logits` [N, k] and `labels` [N] are
always there. A scorer that needs the network itself (ODIN's input gradient) sets `in_network = True`
and implements `network_feature`, computed inside the jitted extraction step under its own name.
The classification head (g: logits = pre_logits @ W + b) is in `ctx.head_kernel` [d, k] and
`ctx.head_bias` [k]. Convention: a higher score means "more in-distribution".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

FEATURES = ("pre_logits", "logits", "labels")
ALL = "all"


@dataclasses.dataclass
class FitContext:
    """What fit() and score() may use besides features: the config, the class count, the head, and a
    cache the scorers of one evaluation share (e.g. per-class Gaussians for three scorers)."""
    config: Any
    num_classes: int
    head_kernel: np.ndarray | None = None
    head_bias: np.ndarray | None = None
    cache: dict = dataclasses.field(default_factory=dict)
    per_set: dict = dataclasses.field(default_factory=dict)  # emptied for every scored set (evaluate)

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """Computed once per evaluation (fits)."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def for_this_set(self, key: str, compute: Callable[[], Any]) -> Any:
        """Computed once per scored set (e.g. the Mahalanobis distances two scorers read)."""
        if key not in self.per_set:
            self.per_set[key] = compute()
        return self.per_set[key]


class Scorer:
    """Base class of the plug-ins (see the module docstring)."""
    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("pre_logits",)
    in_network: ClassVar[bool] = False
    description: ClassVar[str] = ""
    rank: ClassVar[int] = 100  # position in reports and in "all" (the paper's own scorers first)

    def network_feature(self, logits_fn, images, config):
        """In-network per-example feature [B] (jax), for scorers with in_network = True."""
        raise NotImplementedError

    def network_cache_key(self, config) -> str:
        """The settings network_feature depends on (part of the feature cache key)."""
        return ""

    def fit(self, train: Mapping[str, np.ndarray], ctx: FitContext) -> Any:
        return None

    def score(self, fitted: Any, features: Mapping[str, np.ndarray], ctx: FitContext):
        raise NotImplementedError


REGISTRY: dict[str, Scorer] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: adds one instance of the scorer to REGISTRY under cls.name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"two scorers are named {cls.name!r}: {type(REGISTRY[cls.name]).__name__} and {cls.__name__}")
    REGISTRY[cls.name] = cls()
    return cls


# ----------------------------------------------------------------------------------------------------
# Input validation.


def as_matrix(name: str, array, *, dim: int | None = None) -> np.ndarray:
    """Returns `array` as a finite, non-empty numpy [N, D] array, or raises a ValueError naming the fix."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_examples, dim], got shape {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); pass at least one example of dim >= 1.")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has dim {array.shape[1]} but the fitted model expects {dim}; "
                         "score the same feature layer the model was fitted on.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued, got dtype {array.dtype}.")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} non-finite (NaN/inf) values in "
                         f"{bad_rows.size} row(s), first rows {bad_rows[:10].tolist()}; "
                         "fix the feature extraction or drop those examples.")
    return array


def check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
    return dtype


def check_chunk(name: str, value: int) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def chunks(num: int, chunk_size: int):
    for start in range(0, num, chunk_size):
        yield start, min(start + chunk_size, num)


def padded_chunk(array: np.ndarray, start: int, stop: int, rows: int) -> np.ndarray:
    """Rows [start, stop) zero-padded to `rows`, so every device call has one shape (one compilation)."""
    chunk = array[start:stop]
    if chunk.shape[0] == rows:
        return chunk
    return np.concatenate([chunk, np.zeros((rows - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])

