"""SIGTERM (preemption notices) and SIGINT (Ctrl-C) become a checkpoint and a clean exit.

Cloud TPU VMs, spot VMs and most schedulers send SIGTERM before they stop a job; a user stops one with
Ctrl-C. Either way the run saves the current step and exits with 128 + the signal number (143, 130),
and the same command resumes from that step. One process: a signal handler sets a flag checked after
every step. Several processes: JAX's preemption sync point for SIGTERM, so that every host saves the
same step (Ctrl-C there stops the process as Python does).
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class Preempted(SystemExit):
    """Raised after the checkpoint of a signalled run is written; the exit status is 128 + signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(128 + int(signum))
        self.message = message
        logging.warning(message)

    def __str__(self):
        return self.message


class Watcher:
    """Installs the handlers for the training loop; `requested(step)` says whether to stop after it."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        # Under several processes JAX's preemption service handles SIGTERM (every host must save the
        # same step, which a per-process flag cannot promise), and Ctrl-C keeps its default.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("%s received: saving a checkpoint after this step", SIGNALS.get(signum, signum))

    def requested(self, step: int) -> bool:
        if self.signum is not None:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
                    return True
            except RuntimeError:  # the distributed preemption service is not running
                return False
        return False

    @property
    def name(self) -> str:
        return SIGNALS.get(self.signum, "a signal")

    def close(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
