"""`python -m contrastood.main` as a user runs it: mistakes give one line naming the fix (exit 2), two
runs never share a workdir, Ctrl-C saves and exits 130, a full disk loses no finished checkpoint."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/digits.py:smoke"
QUIET = ["--config.ood.run_after_training=False", "--config.clp.run_after_evaluation=False"]


def main(*args, cwd=ROOT, timeout=300, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "contrastood.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("args, fragments", [
    (["--config.train.lerning_rate=0.1"], ["unknown config key", "lerning_rate", "learning_rate"]),
    (["--config.ood.sets.far_noise=noise:gausian:64"], ["ood.sets.far_noise", "unknown noise 'gausian'"]),
    (["--config.train.stage1_steps=-5"], ["train.stage1_steps=-5", "-1 to take the count from the epochs"]),
    (["--config.data.train=npz:/no/such/file.npz"], ["/no/such/file.npz", "does not exist"]),
    (["--config.data.num_classes=9"], ["classes [6, 7, 8] have fewer than 2 training examples"]),
    (["--config.ood.scorers=gaussian,mahalanobiss"], ["ood.scorers", "mahalanobiss"]),
    (["--config.train.batch_size=12"], ["not divisible by the 8 devices"]),
    (["--config.ood.scorers=msp"], ["compare.baseline", "--config.compare.baseline=False"]),
])
def test_mistakes_are_one_line_naming_the_fix(tmp_path, args, fragments):
    assert_one_line_error(main(SMOKE, f"--workdir={tmp_path / 'w'}", *args), *fragments)


def test_an_error_raised_by_the_config_file_keeps_its_message(tmp_path):
    """config_flags wraps get_config's exception twice; the user sees get_config's own message."""
    out = main("--config=configs/digits.py:bogus", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(out, "unknown config variant argument 'bogus'", "valid: smoke")


def test_config_path_resolves_from_any_directory(tmp_path):
    """configs/NAME.py is found in the installed package when it is not relative to the cwd."""
    out = main(SMOKE, f"--workdir={tmp_path / 'w'}", "--config.train.temperature=0", cwd=tmp_path)
    assert_one_line_error(out, "train.temperature must be > 0")  # the config loaded, then validation spoke
    assert_one_line_error(main("--config=configs/nope.py", f"--workdir={tmp_path}", cwd=tmp_path),
                          "configs/nope.py does not exist", "digits.py")


def test_evaluate_never_creates_a_mistyped_workdir(tmp_path):
    assert_one_line_error(main(SMOKE, f"--workdir={tmp_path / 'typo'}", "--mode=evaluate"), "does not exist")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(main(SMOKE, f"--workdir={tmp_path / 'empty'}", "--mode=evaluate"), "train first")


def test_tfds_spec_that_is_not_prepared_fails_in_seconds(tmp_path):
    started = time.time()
    out = main(SMOKE, f"--workdir={tmp_path / 'w'}", "--config.data.test=tfds:cifar10:test",
               f"--config.data.data_dir={tmp_path / 'tfds'}")
    line = assert_one_line_error(out, "not prepared")  # the test set is loaded before anything trains
    assert "does not exist" in line or "not prepared" in line
    out = main(SMOKE, f"--workdir={tmp_path / 'w'}", "--config.data.train=tfds:cifar10:train",
               f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert_one_line_error(out, "not prepared", "prepare_tfds.py", "data.data_dir")
    assert time.time() - started < 120 and not (tmp_path / "tfds").exists()


@pytest.mark.slow
def test_ood_sets_and_tuple_keys_are_overridable(tmp_path):
    workdir = tmp_path / "w"
    out = main(SMOKE, f"--workdir={workdir}", "--config.ood.sets.photos=sklearn:photos:40", "--config.ood.sets.far_noise=",
               "--config.ood.scorers=msp,energy", "--config.ood.plots=False", "--config.clp.run_after_evaluation=False",
               "--config.compare.baseline=False")
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    report = json.loads((workdir / "ood_report.json").read_text())
    assert set(report["results"]) == {"near_digits_6to9", "photos"}
    assert report["scorers"] == ["msp", "energy"]


def start_training(workdir, *extra):
    args = [sys.executable, "-m", "contrastood.main", SMOKE, f"--workdir={workdir}", *QUIET,
            "--config.train.stage1_steps=40", "--config.train.stage2_steps=40", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc, text, lines):
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return
    pytest.fail("".join(lines)[-3000:])


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_is_refused_and_the_first_is_untouched(tmp_path):
    """Was: a second run with another seed overwrote every checkpoint of the first, which exited 0."""
    workdir = tmp_path / "w"
    first = start_training(workdir)
    lines = []
    try:
        wait_for(first, "train/loss", lines)  # it holds the lock and trains
        second = main(SMOKE, f"--workdir={workdir}", *QUIET, "--config.seed=1")
        line = assert_one_line_error(second, "is in use by", f"pid {first.pid}", "delete")
        assert ".lock" in line
        rest, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, ("".join(lines) + rest)[-3000:]
    assert not list((workdir / ".lock").glob("*.json"))  # released
    import json

    assert json.loads((workdir / "config.json").read_text())["seed"] == 0  # the first run's config
    # Resuming the finished workdir with another seed is refused too, naming the change.
    assert_one_line_error(main(SMOKE, f"--workdir={workdir}", *QUIET, "--config.seed=1"),
                          "seed: 0 -> 1", "allow_config_change")


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import json
    import socket

    workdir = tmp_path / "w"
    (workdir / ".lock").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"token": "old", "host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time(),
              "heartbeat": time.time(), "command": "a crashed run"}
    (workdir / ".lock" / "old.json").write_text(json.dumps(holder))
    out = main(SMOKE, f"--workdir={workdir}", *QUIET)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "taking over the stale lock" in out.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    workdir = tmp_path / "w"
    proc = start_training(workdir)
    lines = []
    try:
        wait_for(proc, "] [5] ", lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "stopped by SIGINT (Ctrl-C) at step" in log
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 5 <= steps[-1] < 80


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare for a private tmpfs")
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_finished_checkpoints(tmp_path):
    """A workdir on a 2 MiB tmpfs (a private mount namespace): the save that does not fit fails cleanly."""
    script = f"""
set -e
mkdir -p {tmp_path}/disk
mount -t tmpfs -o size=2m tmpfs {tmp_path}/disk
cd {ROOT}
{sys.executable} -m contrastood.main {SMOKE} --workdir={tmp_path}/disk/w {' '.join(QUIET)} \
  --config.train.stage1_steps=4 --config.train.stage2_steps=40 --config.checkpoint_every_steps=2 \
  --config.keep_checkpoints=100 || echo "exit status $?"
ls {tmp_path}/disk/w/checkpoints
"""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs here: {probe.stderr.decode()[:200]}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "exit status 2" in out.stdout, (out.stdout + out.stderr)[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free space" in errors[0], out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == errors[0]  # orbax logs its background write error above it
    kept = [int(s) for s in out.stdout.split() if s.isdigit()]
    assert kept and min(kept) == 2, out.stdout  # the finished checkpoints are still there
