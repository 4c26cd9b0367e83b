"""Feature extraction for OOD scoring, sharded over all devices, cached in the workdir.

Every scorer works on the same extracted arrays (`pre_logits`, `logits`, and the ODIN score, which
alone needs the network and a gradient), so re-scoring with another scorer or metric never touches
the model again. Cache files are keyed by checkpoint step and dataset spec.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from contrastood import augment, parallel, perf
from contrastood.ood import scorers

FEATURE_KEYS = ("pre_logits", "logits")


def make_extract_step(model, *, odin: bool, odin_temperature: float, odin_epsilon: float) -> Callable:
    """(variables, batch) -> per-example features; ODIN needs the gradient, so it is computed here."""

    def extract(variables: dict, batch: dict) -> dict:
        images = augment.to_float(batch["image"])
        outputs = model.apply(variables, images, train=False)
        features = {k: outputs[k] for k in FEATURE_KEYS}
        if odin:
            logits_fn = lambda x: model.apply(variables, x, train=False)["logits"]  # noqa: E731
            features["odin"] = scorers.odin_score(logits_fn, images, temperature=odin_temperature,
                                                  epsilon=odin_epsilon)
        return features

    return extract


def _cache_path(workdir: str, step: int, spec: str, tag: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)[-60:].strip("_")
    digest = hashlib.sha1(f"{spec}|{tag}".encode()).hexdigest()[:10]
    return os.path.join(workdir, "features", f"step_{step}", f"{readable}-{digest}.npz")


class FeatureExtractor:
    """Extracts (and caches) features of any dataset for one model state."""

    def __init__(self, model, state: Any, config, mesh, workdir: str | None):
        self.config = config
        self.mesh = mesh
        self.workdir = workdir
        self.step = int(state.step)
        self.variables = parallel.replicate({"params": state.params, "batch_stats": state.batch_stats}, mesh)
        self.odin = "odin" in config.ood.scorers
        self.tag = (f"size={config.data.image_size}|odin={self.odin}|T={config.ood.odin_temperature}"
                    f"|eps={config.ood.odin_epsilon}")
        shardings = dict(in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                         out_shardings=parallel.replicated(mesh), compiler_options=perf.compiler_options())
        self._steps = {
            odin: jax.jit(make_extract_step(model, odin=odin, odin_temperature=config.ood.odin_temperature,
                                            odin_epsilon=config.ood.odin_epsilon), **shardings)
            for odin in {False, self.odin}
        }

    def __call__(self, dataset, *, fit_only: bool = False) -> dict[str, np.ndarray]:
        """Features of every example of `dataset` (an ArrayDataset), exactly once, in dataset order.

        `fit_only`: the set only fits scorers (the in-distribution train split), so the per-input ODIN
        score, which costs a backward pass, is skipped.
        """
        with_odin = self.odin and not fit_only
        tag = f"{self.tag}|odin_computed={with_odin}"
        path = _cache_path(self.workdir, self.step, dataset.name, tag) if self.workdir else None
        cached = _read_cache(path, len(dataset.labels)) if path else None
        # Extraction is collective: every process must take the same branch, so the cache is used only
        # where all of them could read it (process 0 may have written it since another one looked).
        if _all_processes(cached is not None):
            logging.info("features of %s at step %d from cache %s", dataset.name, self.step, path)
            return cached
        result = self._extract(dataset, with_odin)
        if path and jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, **result)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
        return result

    def _extract(self, dataset, with_odin: bool) -> dict[str, np.ndarray]:
        from contrastood import input_pipeline

        stream = input_pipeline.eval_batches(dataset, global_batch_size=self.config.eval_batch_size,
                                             image_size=self.config.data.image_size)
        chunks: dict[str, list[np.ndarray]] = {}
        indices = []
        for batch in stream:
            out = self._steps[with_odin](self.variables, parallel.to_global({"image": batch["image"]}, self.mesh))
            out = jax.device_get(out)
            # Under several processes each host holds the whole (replicated) output but only its local
            # indices; the global index array below puts every example back in its place.
            global_index = _gather_indices(batch["index"], self.mesh)
            keep = global_index >= 0
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v)[keep])
            indices.append(global_index[keep])
        order = np.argsort(np.concatenate(indices), kind="stable")
        result = {k: np.concatenate(v)[order] for k, v in chunks.items()}
        result["labels"] = np.asarray(dataset.labels)
        if len(order) != len(dataset.labels):
            raise RuntimeError(f"extracted {len(order)} examples of {dataset.name} but it has {len(dataset.labels)}")
        return result


def _read_cache(path: str, num_examples: int) -> dict[str, np.ndarray] | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as cached:
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
