"""TensorBoard summaries through clu on process 0, and a TensorFlow-free fallback.

clu's writers need TensorFlow (tf.summary), which GPU images often lack. Without it, summaries go to
the log and, where PyTorch is installed, to TensorBoard event files written by
torch.utils.tensorboard (local workdirs only); training never depends on TensorFlow.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import numpy as np


def tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def create_writer(workdir, *, just_logging: bool = False):
    """clu's default writer (TensorBoard + log) when TensorFlow is importable, else the fallback."""
    if tensorflow_available():
        from clu import metric_writers

        return metric_writers.create_default_writer(os.fspath(workdir), just_logging=just_logging)
    return FallbackWriter(workdir, just_logging=just_logging)


def summary_writer(workdir):
    """A TensorBoard-only writer (no log lines): for reports whose numbers are already printed."""
    if tensorflow_available():
        from clu import metric_writers

        return metric_writers.SummaryWriter(os.fspath(workdir))
    return FallbackWriter(workdir, log=False)


class FallbackWriter:
    """clu's MetricWriter methods, writing to the log and, when possible, torch's TensorBoard writer."""

    def __init__(self, workdir, *, just_logging: bool = False, log: bool = True):
        self._log = log
        self._board = None
        path = os.fspath(workdir)
        if not just_logging and "://" not in path:
            try:
                from torch.utils import tensorboard

                self._board = tensorboard.SummaryWriter(path)
            except ImportError:
                pass
        if self._board is None and not just_logging:
            logging.info("TensorFlow is not installed: summaries go to the log only")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._log:
            logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
        if self._board is not None:
            for key, value in scalars.items():
                self._board.add_scalar(key, float(value), step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        if self._board is not None:
            for key, value in images.items():
                self._board.add_images(key, np.asarray(value), step, dataformats="NHWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._log:
            logging.info("hparams: %s", dict(hparams))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self._log:
            for key, value in texts.items():
                logging.info("[%d] %s: %s", step, key, value)

    def flush(self) -> None:
        if self._board is not None:
            self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


class Progress:
    """Logs steps/s and the time to the end every `every_steps` steps (what clu's ReportProgress
    logs, without its TensorFlow dependency)."""

    def __init__(self, total_steps: int, every_steps: int):
        self.total_steps, self.every_steps = total_steps, max(1, every_steps)
        self._last_step: int | None = None
        self._last_time = time.time()

    def __call__(self, step: int) -> None:
        now = time.time()
        if self._last_step is None:
            self._last_step, self._last_time = step - 1, now
        if step % self.every_steps and step != self.total_steps:
            return
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        remaining = (self.total_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d: %.3g steps/s, %s to go", step, self.total_steps, rate, _duration(remaining))
        self._last_step, self._last_time = step, now


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
