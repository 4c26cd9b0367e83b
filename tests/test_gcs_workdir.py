"""`--workdir=gs://BUCKET/run` end to end against a real GCS server on localhost (tests/gcs_emulator.py).

`python -m contrastood.main` trains the digits smoke config into the bucket, is killed mid-run
(SIGKILL: no chance to clean up, so its lock is left behind) and resumed from the checkpoint in the
bucket, then evaluates and runs the CLP study. Checked through the emulator's JSON API: checkpoints,
config.json, TensorBoard events, feature caches, reports, plots and the CLP members are objects in the
bucket, nothing was written under the local working directory, and a second run on the same gs://
workdir is refused by the lock.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (pip install -e .[test])")
pytest.importorskip("google.cloud.storage", reason="orbax needs google-cloud-storage for gs:// checkpoints")

from gcs_emulator import gcs_emulator  # noqa: E402,F401  (the session-scoped fixture)

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/digits.py:smoke"
STEPS = ["--config.train.stage1_steps=6", "--config.train.stage2_steps=6", "--config.checkpoint_every_steps=4",
         "--config.log_every_steps=1"]


def run(emulator, cwd, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "contrastood.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=emulator.subprocess_env({**os.environ, "PYTHONUNBUFFERED": "1"}))


def names(emulator, prefix):
    return emulator.object_names(prefix)


def test_a_gs_workdir_trains_resumes_evaluates_and_runs_clp(gcs_emulator, tmp_path):
    emulator = gcs_emulator
    workdir = f"gs://{emulator.bucket}/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    repo_before = set(os.listdir(ROOT))

    # Train, and kill the run with SIGKILL after step 5 (its checkpoint at step 4 is in the bucket).
    proc = subprocess.Popen([sys.executable, "-m", "contrastood.main", SMOKE, f"--workdir={workdir}", *STEPS,
                             "--config.ood.run_after_training=False", "--config.clp.run_after_evaluation=False"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=emulator.subprocess_env({**os.environ, "PYTHONUNBUFFERED": "1"}))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "] [6] " in line and "train/loss" in line:
                deadline = time.time() + 60  # step 4's asynchronous save commits in the background
                while "run/checkpoints/4/commit_success.txt" not in names(emulator, "run/") and time.time() < deadline:
                    time.sleep(0.2)
                proc.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the workdir
                # A second run on the same gs:// workdir is refused by the lock in the bucket.
                second = run(emulator, cwd, SMOKE, f"--workdir={workdir}", *STEPS)
                assert second.returncode == 2 and "is in use by" in second.stderr, second.stderr[-3000:]
                assert "run/checkpoints/4/commit_success.txt" in names(emulator, "run/"), "step 4 not saved"
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert any(n.startswith("run/.lock/") for n in names(emulator, "run/")), "the killed run's lock is gone"

    # Resume (the dead holder's lock is taken over: same host, process gone), evaluate, CLP.
    resumed = run(emulator, cwd, SMOKE, f"--workdir={workdir}", *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    restored = re.search(r"restored the checkpoint at step (\d+)", resumed.stderr)
    assert restored and int(restored[1]) in (4, 8), resumed.stderr[-3000:]  # from the bucket, not from scratch
    assert "taking over the stale lock" in resumed.stderr
    evaluated = run(emulator, cwd, SMOKE, f"--workdir={workdir}", *STEPS, "--mode=evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert "from cache gs://" in evaluated.stderr  # the features the training run cached in the bucket
    clp = run(emulator, cwd, SMOKE, f"--workdir={workdir}", *STEPS, "--mode=clp")
    assert clp.returncode == 0, clp.stderr[-4000:]

    objects = names(emulator, "run/")
    for expected in ("run/config.json", "run/ood_report.json", "run/ood_report.md", "run/ood_scores.npz",
                     "run/clp_report.json", "run/clp_report.md", "run/plots/histogram_gaussian.png",
                     "run/plots/clp_dendrogram.png"):
        assert expected in objects, (expected, sorted(objects)[:50])
    assert any(n.startswith("run/checkpoints/12/model/") for n in objects)
    assert any(n.startswith("run/checkpoints/12/opt/") for n in objects)
    assert any(n.startswith("run/events.out.tfevents") for n in objects)
    assert any(n.startswith("run/features/step_12/") and n.endswith(".npz") for n in objects)
    assert any(n.startswith("run/clp/member_1/checkpoints/") for n in objects)
    assert not any(n.startswith("run/.lock/") and n.endswith(".json") for n in objects)  # released
    report = json.loads(emulator.read_object(f"{workdir}/ood_report.json"))
    assert report["step"] == 12 and report["failed_scorers"] == {}

    # Nothing was written locally: not under the working directory, not as a "gs:" folder in the repo.
    assert not list(cwd.iterdir()), list(cwd.iterdir())
    assert set(os.listdir(ROOT)) == repo_before


def test_a_relative_local_workdir_still_works(tmp_path):
    out = subprocess.run([sys.executable, "-m", "contrastood.main", f"--config={ROOT / 'configs' / 'digits.py'}:smoke",
                          "--workdir=relative/run", "--config.ood.run_after_training=False",
                          "--config.clp.run_after_evaluation=False"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "relative" / "run" / "checkpoints" / "8" / "model").is_dir()
    assert (tmp_path / "relative" / "run" / "config.json").exists()
