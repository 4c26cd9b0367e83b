"""From sources to per-host batches: samplers, host slicing, decode workers, prefetch, eval padding.

Training batches are a pure function of (seed, step): batch k of a resumed run equals batch k of an
uninterrupted one, with nothing replayed. Host p of P takes the p-th contiguous slice of every global
batch and reads only those examples. Evaluation batches cover every example exactly once, in
order, across hosts; the last one is padded and masked.

Where images are cut: a source whose images are already image_size x image_size (CIFAR arrays at
32 px) is gathered as is, and SimCLR's random resized crop runs on the device inside the train step.
Any other source (image files, TFDS, arrays of another size) gets its crops cut on the host from the
original image, two views per example for contrastive training, by a thread pool of decode workers;
the device then applies flip and colour distortion only. An example's host crop depends only on
(seed, step, position in the global batch, view), so it too is the same after a resume and on any
number of hosts.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from contrastood import errors
from contrastood.data import images as images_lib
from contrastood.data import sources as sources_lib

SAMPLERS = ("epoch", "uniform_class")
STORED_PERMUTATION_MAX = 1 << 22  # above this, epochs are shuffled by a keyed bijection, not a stored array


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def process_layout(global_batch_size: int, process_index: int | None = None,
                   process_count: int | None = None) -> tuple[int, int, int]:
    """-> (process_index, process_count, local_batch_size) with checks."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise errors.ConfigError(f"global batch size {global_batch_size} must be a positive multiple of the "
                                 f"{process_count} processes; pick e.g. "
                                 f"{max(1, round(global_batch_size / process_count)) * process_count}")
    return process_index, process_count, global_batch_size // process_count


# --------------------------------------------------------------------------------------------- samplers


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed hash of uint64s."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def index_shuffle(positions: np.ndarray, num_examples: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, num_examples) evaluated pointwise (O(1) memory per position).

    A 4-round Feistel network on the smallest even-bit power-of-two domain >= num_examples, with
    cycle walking back into range: the equivalent of tf.random.experimental.index_shuffle, for epochs
    too large to store a permutation.
    """
    bits = max(2, int(np.ceil(np.log2(max(num_examples, 2)))))
    bits += bits % 2
    half = bits // 2
    mask = np.uint64((1 << half) - 1)
    key = np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    out = np.asarray(positions, np.uint64).copy()
    pending = np.ones(out.shape, bool)
    while pending.any():
        x = out[pending]
        left, right = x >> np.uint64(half), x & mask
        for round_index in range(4):
            with np.errstate(over="ignore"):
                mixed = _mix64(right ^ (key + np.uint64(0x9E3779B97F4A7C15) * np.uint64(round_index + 1)))
            left, right = right, left ^ (mixed & mask)
        x = (left << np.uint64(half)) | right
        out[pending] = x
        pending[pending] = x >= np.uint64(num_examples)
    return out.astype(np.int64)


def epoch_indices(num_examples: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Maps global stream positions to example indices: epoch e is a permutation keyed by (seed, e)."""

    @functools.lru_cache(maxsize=4)
    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(num_examples)

    def indices(positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            if num_examples <= STORED_PERMUTATION_MAX:
                out[at] = permutation(int(epoch))[offsets[at]]
            else:
                key = int(np.random.default_rng([seed, int(epoch)]).integers(1 << 62))
                out[at] = index_shuffle(offsets[at], num_examples, key)
        return out

    return indices


def uniform_class_indices(labels: np.ndarray, seed: int, global_batch_size: int) -> Callable[[int], np.ndarray]:
    """Global batch of a step: a class uniformly (among classes present), then an example in it."""
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)

    def indices(step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        classes = rng.integers(len(counts), size=global_batch_size)
        within = rng.integers(0, counts[classes])
        return order[starts[classes] + within]

    return indices


def global_batch_indices(source: sources_lib.Source, *, global_batch_size: int, seed: int,
                         sampling: str) -> Callable[[int], np.ndarray]:
    """step -> the example indices of the whole global batch."""
    if sampling == "epoch":
        epoch = epoch_indices(len(source), int(seed))
        offsets = np.arange(global_batch_size, dtype=np.int64)
        return lambda step: epoch(step * global_batch_size + offsets)
    if sampling == "uniform_class":
        if source.num_classes == 0:
            raise errors.ConfigError(f"{source.name}: sampling='uniform_class' needs labels; use "
                                     "--config.train.sampling=epoch for an unlabelled dataset")
        return uniform_class_indices(source.labels, int(seed), global_batch_size)
    raise errors.ConfigError(f"unknown sampling {sampling!r}; set --config.train.sampling to one of {SAMPLERS}")


# --------------------------------------------------------------------------------------------- prefetch


def prefetch(produce: Callable[[Any], Any], items: Iterable[Any], buffer_size: int,
             name: str = "prefetch") -> Iterator[Any]:
    """Runs produce(item) in a daemon thread, `buffer_size` results ahead of the consumer.

    The thread stops when the consumer's generator is closed or garbage collected; errors in the
    thread re-raise in the consumer.
    """
    if buffer_size <= 0:
        yield from map(produce, items)
        return
    buffer: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((True, produce(item))):
                    return
            put((None, None))
        except BaseException as error:  # pylint: disable=broad-except
            put((False, error))
        finally:
            if hasattr(items, "close"):  # a generator of another prefetch: stop its thread too
                items.close()

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while True:
            ok, value = buffer.get()
            if ok is None:
                return
            if not ok:
                raise value
            yield value
    finally:
        # Stop and join the worker: a thread left inside a device transfer when the interpreter exits
        # can abort the process (seen after Ctrl-C).
        stop.set()
        thread.join(timeout=30)


# --------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class HostCrop:
    """SimCLR's random resized crop, cut on the host from the original image (see the module docstring)."""
    area: tuple[float, float]
    aspect: tuple[float, float]


def crops_on_host(source: sources_lib.Source, image_size: int, mode: str = "auto") -> bool:
    """Whether train crops are cut on the host: 'auto' unless the source is already image_size arrays."""
    if mode == "host":
        return True
    if mode == "device":
        return False
    return source.image_shape != (image_size, image_size)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A second, unlabelled source whose examples fill `fraction` of every global batch (label -1)."""
    source: sources_lib.Source
    fraction: float

    def counts(self, global_batch_size: int) -> tuple[int, int]:
        unlabelled = int(round(self.fraction * global_batch_size))
        return global_batch_size - unlabelled, unlabelled


def train_batches(source: sources_lib.Source, *, global_batch_size: int, seed: int, image_size: int,
                  start_step: int = 0, sampling: str = "epoch", host_crop: HostCrop | None = None,
                  views: int = 1, unlabelled: Mixture | None = None, process_index: int | None = None,
                  process_count: int | None = None, workers: int | None = None,
                  buffer_size: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this host's batches.

    Each batch is {"image": uint8 [B/P, S, S, 3], "label": int32 [B/P]}; with `host_crop` and
    views=2, "image" is [B/P, 2, S, S, 3] (two host-cut views per example). With `unlabelled`, the
    first (1 - f) B positions of every global batch come from `source` and the rest from the
    unlabelled source (label -1), each from its own (seed, step) stream.

    sampling="epoch": epoch permutations back to back; every example once per epoch.
    sampling="uniform_class": each slot draws a class uniformly among those present, then an example.
    """
    process_index, _, local_batch_size = process_layout(global_batch_size, process_index, process_count)
    if len(source) == 0:
        raise errors.DataError(f"{source.name}: cannot draw training batches from an empty dataset")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    labelled_count, unlabelled_count = unlabelled.counts(global_batch_size) if unlabelled else (global_batch_size, 0)
    if labelled_count <= 0:
        raise errors.ConfigError("data.unlabelled_fraction leaves no labelled example in a batch; lower it")
    streams = [(source, global_batch_indices(source, global_batch_size=labelled_count, seed=seed, sampling=sampling))]
    if unlabelled_count:
        streams.append((unlabelled.source, global_batch_indices(unlabelled.source, global_batch_size=unlabelled_count,
                                                                seed=seed + 7919, sampling="epoch")))
    host = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    pool = sources_lib.thread_pool(workers or default_workers())

    def make_batch(step: int) -> dict[str, np.ndarray]:
        parts = []
        for k, (part_source, indices_of) in enumerate(streams):
            indices = indices_of(step)
            parts.append((k, part_source, indices))
        # The global positions this host owns, then the (source, index) behind each of them.
        owners = np.concatenate([np.full(len(ix), k) for k, _, ix in parts])[host]
        local = np.concatenate([ix for _, _, ix in parts])[host]
        positions = np.arange(global_batch_size)[host]
        labels = np.empty(local_batch_size, np.int32)
        shape = (local_batch_size, views, image_size, image_size, 3) if host_crop else \
            (local_batch_size, image_size, image_size, 3)
        images = np.empty(shape, np.uint8)
        for k, part_source, _ in parts:
            at = np.flatnonzero(owners == k)
            if not at.size:
                continue
            labels[at] = part_source.labels[local[at]] if k == 0 else -1
            if host_crop is None:
                images[at] = part_source.fetch(local[at], image_size, pool)
            else:
                images[at] = _host_crops(part_source, local[at], positions[at], step, seed, image_size, host_crop,
                                         views, pool)
        return {"image": images, "label": labels}

    return prefetch(make_batch, itertools.count(start_step), buffer_size, name="train_batches")


def _host_crops(source, indices, positions, step, seed, size, crop: HostCrop, views, pool) -> np.ndarray:
    def one(item):
        index, position = item
        image = source.image(int(index))
        out = []
        for view in range(views):
            rng = np.random.default_rng([seed, step, int(position), view, 0x5EED])
            out.append(images_lib.random_resized_crop(image, rng, size, crop.area, crop.aspect))
        return np.stack(out)

    return np.stack(list(sources_lib._map(pool, one, list(zip(indices, positions)))))


# --------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True, eq=False)
class EvalStream:
    """Re-iterable, padded evaluation batches of one host, resized to image_size x image_size.

    Global batch k covers examples [k*B, (k+1)*B); host p gets its p-th contiguous slice of B/P
    positions. Positions past the end are padding (zero image, label -1, index -1, mask False), so
    every example is seen exactly once over all hosts and every host yields `num_batches` batches.
    The next batch is read and decoded while the current one is on the device.
    """
    source: sources_lib.Source
    global_batch_size: int
    image_size: int
    process_index: int
    process_count: int
    workers: int = 0
    buffer_size: int = 2

    @property
    def num_examples(self) -> int:
        return len(self.source)

    @property
    def num_batches(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> dict[str, np.ndarray]:
        n, size = self.num_examples, self.local_batch_size
        start = k * self.global_batch_size + self.process_index * size
        index = np.arange(start, start + size, dtype=np.int64)
        mask = index < n
        image = np.zeros((size, self.image_size, self.image_size, 3), np.uint8)
        pool = sources_lib.thread_pool(self.workers or default_workers())
        image[mask] = self.source.fetch(index[mask], self.image_size, pool)
        label = np.full(size, -1, np.int32)
        label[mask] = self.source.labels[index[mask]]
        return {"image": image, "label": label, "mask": mask, "index": np.where(mask, index, -1).astype(np.int32)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return prefetch(self.batch, range(self.num_batches), self.buffer_size, name="eval_batches")


def eval_batches(source: sources_lib.Source, *, global_batch_size: int, image_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 workers: int = 0) -> EvalStream:
    process_index, process_count, _ = process_layout(global_batch_size, process_index, process_count)
    if not isinstance(source, sources_lib.Source):
        raise TypeError(f"eval_batches needs a data.Source, got {type(source).__name__}")
    return EvalStream(source, global_batch_size, image_size, process_index, process_count, workers)


def channel_statistics(source: sources_lib.Source, image_size: int, limit: int = 10_000,
                       batch: int = 500) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1]) of up to `limit` images in a fixed order (seed 0), at
    image_size: the same values every time for the same data, so evaluation recomputes them."""
    order = np.sort(np.random.default_rng(0).permutation(len(source))[:limit])
    pool = sources_lib.thread_pool(default_workers())
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(order), batch):
        pixels = source.fetch(order[start:start + batch], image_size, pool).astype(np.float64) / 255.0
        total += pixels.sum(axis=(0, 1, 2))
        total_sq += (pixels ** 2).sum(axis=(0, 1, 2))
        count += pixels.shape[0] * pixels.shape[1] * pixels.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
