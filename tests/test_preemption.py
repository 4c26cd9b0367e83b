"""SIGTERM to a real training process: it checkpoints and exits; the restart ends where an
uninterrupted run ends, parameter for parameter."""
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastood import checkpointing, models, parallel, train
from contrastood.configs import digits

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
OVERRIDES = [f"--config.train.stage1_steps={STEPS // 2}", f"--config.train.stage2_steps={STEPS // 2}",
             "--config.checkpoint_every_steps=100", "--config.log_every_steps=1",
             "--config.ood.run_after_training=False", "--config.clp.run_after_evaluation=False"]


def launch(workdir):
    cmd = [sys.executable, "-m", "contrastood.main", "--config=configs/digits.py:smoke", f"--workdir={workdir}",
           *OVERRIDES]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def final_params(workdir):
    config = digits.get_config("smoke")
    model = models.create_model(config.model, config.data.num_classes)
    tx = train.create_optimizer(config, lambda s: 0.1)
    state = checkpointing.Checkpoints(str(workdir)).restore_latest(
        train.abstract_train_state(model, tx, config, parallel.create_mesh()), move_unreadable=False)
    return int(state.step), jax.device_get(state.params)


def test_sigterm_checkpoints_and_resumes_to_the_same_parameters(tmp_path):
    reference = launch(tmp_path / "reference")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    workdir = tmp_path / "preempted"
    proc = launch(workdir)
    lines = []
    for line in proc.stdout:  # wait until a few steps have run, then preempt
        lines.append(line)
        if "train/loss" in line and "] [5] " in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 143, log[-3000:]
    assert "stopped by SIGTERM at step" in log
    saved_step, _ = final_params(workdir)
    assert 5 <= saved_step < STEPS

    resumed = launch(workdir)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"restored the checkpoint at step {saved_step}" in out
    step_a, params_a = final_params(tmp_path / "reference")
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == STEPS
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
