"""Feature extraction for OOD scoring, sharded over all devices, cached in the workdir.

Every scorer works on the same extracted arrays (`pre_logits`, `logits`, plus the in-network features
that scorers such as ODIN need), so re-scoring with another scorer or metric never touches the model
again. A cache file is keyed by a digest of the model's variables, the dataset's content fingerprint
(`data.Source.fingerprint`), the image size and the in-network features' settings: features of one
model or one version of the data are never reported as another's.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath

from contrastood import augment, parallel, perf, workdir as workdir_lib
from contrastood.data import pipeline, sources
from contrastood.ood import scorers as scorers_lib

FEATURE_KEYS = ("pre_logits", "logits")
CACHE_VERSION = 2  # bump when what an extracted array means changes


def make_extract_step(model, network_scorers: Sequence[scorers_lib.Scorer], config) -> Callable:
    """(variables, batch) -> per-example features; in-network scorers (ODIN) compute theirs here."""

    def extract(variables: dict, batch: dict) -> dict:
        images = augment.to_float(batch["image"])
        outputs = model.apply(variables, images, train=False)
        features = {k: outputs[k] for k in FEATURE_KEYS}
        logits_fn = lambda x: model.apply(variables, x, train=False)["logits"]  # noqa: E731
        for scorer in network_scorers:
            features[scorer.name] = scorer.network_feature(logits_fn, images, config)
        return features

    return extract


def model_digest(variables) -> str:
    """A digest of every parameter and BatchNorm statistic (host copies of replicated arrays)."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables)):
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(array.dtype).encode() + str(array.shape).encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def _cache_path(workdir: epath.Path, step: int, name: str, key: str) -> epath.Path:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:].strip("_")
    return workdir / "features" / f"step_{step}" / f"{readable}-{key[:16]}.npz"


class FeatureExtractor:
    """Extracts (and caches) features of any source for one model state."""

    def __init__(self, model, state: Any, config, mesh, workdir, scorer_names: Sequence[str] | None = None):
        self.config = config
        self.mesh = mesh
        self.workdir = workdir_lib.as_path(workdir) if workdir is not None else None
        self.step = int(state.step)
        variables = state.variables
        self.model_digest = model_digest(variables)
        self.variables = parallel.replicate(variables, mesh)
        names = scorers_lib.resolve(config.ood.scorers if scorer_names is None else scorer_names)
        self.network_scorers = [scorers_lib.REGISTRY[n] for n in names if scorers_lib.REGISTRY[n].in_network]
        options = perf.compiler_options(perf.workload(config, mesh.devices.size),  # the train step's choice
                                        getattr(model, "conv_impl", "xla"))
        shardings = dict(in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                         out_shardings=parallel.replicated(mesh), compiler_options=options)
        self._steps: dict[bool, Callable] = {}
        for with_network in {False, bool(self.network_scorers)}:
            chosen = self.network_scorers if with_network else []
            self._steps[with_network] = jax.jit(make_extract_step(model, chosen, config), **shardings)

    def cache_key(self, source: sources.Source, with_network: bool) -> str:
        network = ";".join(f"{s.name}:{s.network_cache_key(self.config)}" for s in self.network_scorers) \
            if with_network else ""
        return hashlib.blake2b("|".join([
            f"v{CACHE_VERSION}", self.model_digest, source.fingerprint(), f"size={self.config.data.image_size}",
            network]).encode(), digest_size=16).hexdigest()

    def __call__(self, source: sources.Source, *, fit_only: bool = False) -> dict[str, np.ndarray]:
        """Features of every example of `source`, exactly once, in source order.

        `fit_only`: the set only fits scorers (the in-distribution train split), so in-network features,
        which cost a backward pass (ODIN), are skipped.
        """
        with_network = bool(self.network_scorers) and not fit_only
        path = None
        if self.workdir is not None:
            path = _cache_path(self.workdir, self.step, source.name, self.cache_key(source, with_network))
        cached = _read_cache(path, len(source)) if path is not None else None
        # Extraction is collective: every process must take the same branch, so the cache is used only
        # where all of them could read it (process 0 may have written it since another one looked).
        if _all_processes(cached is not None):
            logging.info("features of %s at step %d from cache %s", source.name, self.step, path)
            return cached
        result = self._extract(source, with_network)
        if path is not None and jax.process_index() == 0:
            buffer = io.BytesIO()
            np.savez(buffer, **result)
            workdir_lib.atomic_write_bytes(path, buffer.getvalue())  # a crash never leaves a half-written file
        return result

    def _extract(self, source: sources.Source, with_network: bool) -> dict[str, np.ndarray]:
        stream = pipeline.eval_batches(source, global_batch_size=self.config.eval_batch_size,
                                       image_size=self.config.data.image_size, workers=self.config.data.num_workers)
        chunks: dict[str, list[np.ndarray]] = {}
        indices = []
        step = self._steps[with_network]
        for batch in stream:
            out = jax.device_get(step(self.variables, parallel.to_global({"image": batch["image"]}, self.mesh)))
            # Under several processes each host holds the whole (replicated) output but only its local
            # indices; the global index array below puts every example back in its place.
            global_index = _gather_indices(batch["index"], self.mesh)
            keep = global_index >= 0
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v)[keep])
            indices.append(global_index[keep])
        order = np.argsort(np.concatenate(indices), kind="stable")
        result = {k: np.concatenate(v)[order] for k, v in chunks.items()}
        result["labels"] = np.asarray(source.labels)
        if len(order) != len(source):
            raise RuntimeError(f"extracted {len(order)} examples of {source.name} but it has {len(source)}")
        return result


def _read_cache(path: epath.Path, num_examples: int) -> dict[str, np.ndarray] | None:
    try:
        if not path.exists():
            return None
        with np.load(io.BytesIO(path.read_bytes())) as cached:
            if len(cached["labels"]) == num_examples:
                return dict(cached)
    except Exception as error:  # a truncated cache file is recomputed, never trusted
        logging.warning("ignoring unreadable feature cache %s (%s)", path, error)
    return None


def _all_processes(flag: bool) -> bool:
    """True where `flag` holds on every process (a collective under several processes)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _gather_indices(local_index: np.ndarray, mesh) -> np.ndarray:
    """The global example indices of a batch, in global batch order (the local ones on one host).

    `parallel.to_global` lays out process p's rows after those of processes < p (devices are ordered
    by process), which is the order `process_allgather` concatenates in.
    """
    local_index = np.asarray(local_index, np.int32)
    if jax.process_count() == 1:
        return local_index
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local_index, tiled=True))
