"""launch/: syntax of every script, the TPU VM workflow's dry run (no gcloud, no network), and the
worker-side job runner, with fake `gcloud` and `python3` executables standing in for the cloud."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
WORKER = LAUNCH / "tpu_worker.sh"

SLICE = ["--name=c10-run", "--zone=us-central2-b", "--project=my-proj"]
# An override that has to survive two levels of shell quoting (local argv -> --command -> remote shell).
NASTY = "--config.data.train=tfds:cifar10:train[:90%]#classes=0-5 it's \"$HOME\" `x` \\ !"
RUN = [*SLICE, "--bucket=gs://my-bucket/", "--config=configs/cifar10.py",
       "--config.train.batch_size=4096", NASTY]
WORKDIR = "gs://my-bucket/contrastood/c10-run"
DATA_DIR = "gs://my-bucket/tensorflow_datasets"


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A bin dir whose gcloud/gsutil record their argv (JSON lines) in calls.jsonl.

    FAKE_GCLOUD=fail makes them exit 97 (a dry run must never get there); FAKE_STATE is what
    `describe --format=value(state)` prints (unset: the slice does not exist, exit 1); scp copies its
    local source into FAKE_SCP_DIR.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = f"""#!{sys.executable}
import json, os, shutil, sys
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_GCLOUD") == "fail":
    sys.exit(97)
args = sys.argv[1:]
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    if not os.environ.get("FAKE_STATE"):
        sys.exit(1)
    print(os.environ["FAKE_STATE"])
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.environ.get("FAKE_SCP_DIR"):
    shutil.copy(args[4], os.environ["FAKE_SCP_DIR"])
"""
    _write_exe(bin_dir / "gcloud", fake)
    _write_exe(bin_dir / "gsutil", fake)
    return bin_dir


def _calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _env(fake_bin, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "DRY_RUN"}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(fake_bin.parent)
    env.update(extra)
    return env


def tpu_vm(fake_bin, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU_VM), *args], capture_output=True, text=True, cwd=REPO,
                          env=_env(fake_bin, **env), timeout=60)


def dry(fake_bin, *args, **env) -> list[list[str]]:
    """The dry run's commands, each parsed back into an argv; asserts that gcloud never ran."""
    before = len(_calls(fake_bin.parent))
    result = tpu_vm(fake_bin, "--dry-run", *args, FAKE_GCLOUD="fail", **env)
    assert result.returncode == 0, result.stderr
    assert len(_calls(fake_bin.parent)) == before, "the dry run executed gcloud"
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _remote(argv) -> list[str]:
    """The remote command of a gcloud ssh call, parsed as the worker's shell parses it."""
    return shlex.split(_flag(argv, "command"))


def _gcloud_tpu(argv, sub):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", sub], argv
    assert _flag(argv, "zone") == "us-central2-b"
    assert _flag(argv, "project") == "my-proj"


# ------------------------------------------------------------------------------------------------
# Syntax.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_shellcheck(script):
    subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)


def test_help(fake_bin):
    result = tpu_vm(fake_bin, "--help")
    assert result.returncode == 0
    for word in ["create", "install", "prepare-data", "train", "logs", "tensorboard", "delete", "all",
                 "--dry-run", "--spot", "--preemptible", "TPU_ZONE", "143"]:
        assert word in result.stdout


# ------------------------------------------------------------------------------------------------
# The dry run of the whole workflow.
# ------------------------------------------------------------------------------------------------

def test_dry_run_full_workflow(fake_bin):
    create = dry(fake_bin, "create", *SLICE, "--accelerator=v4-32", "--spot")
    install = dry(fake_bin, "install", *SLICE)
    prepare = dry(fake_bin, "prepare-data", *RUN)
    train = dry(fake_bin, "train", *RUN)
    logs = dry(fake_bin, "logs", *SLICE)
    tensorboard = dry(fake_bin, "tensorboard", *SLICE, "--bucket=gs://my-bucket")
    stop = dry(fake_bin, "stop", *SLICE)
    delete = dry(fake_bin, "delete", *SLICE)

    # create: a describe (to skip an existing slice), then the create itself.
    assert len(create) == 2
    _gcloud_tpu(create[0], "describe")
    assert create[0][5] == "c10-run"
    _gcloud_tpu(create[1], "create")
    assert create[1][5] == "c10-run"
    assert _flag(create[1], "accelerator-type") == "v4-32"
    assert _flag(create[1], "version") == "tpu-ubuntu2204-base"
    assert "--spot" in create[1] and "--preemptible" not in create[1]

    # install: the tarball to every worker, then unpack and pip install on every worker.
    assert len(install) == 2
    _gcloud_tpu(install[0], "scp")
    assert install[0][5].endswith("contrastood-c10-run.tar.gz")
    assert install[0][6] == "c10-run:contrastood.tar.gz"
    assert _flag(install[0], "worker") == "all"
    _gcloud_tpu(install[1], "ssh")
    assert install[1][5] == "c10-run" and _flag(install[1], "worker") == "all"
    remote = _remote(install[1])
    assert remote[remote.index("venv") - 3:] == [
        "python3", "-m", "uv", "venv", "--python", "3.11", ".venv", "&&",
        "python3", "-m", "uv", "pip", "install", "--python", ".venv/bin/python", "-e", ".", "jax[tpu]"]
    tar = remote.index("tar")
    assert remote[tar:tar + 5] == ["tar", "-xzf", "contrastood.tar.gz", "-C", "contrastood.new"]

    # prepare-data: once, on worker 0, into the bucket, for the config (and its overrides).
    assert len(prepare) == 1
    _gcloud_tpu(prepare[0], "ssh")
    assert _flag(prepare[0], "worker") == "0"
    remote = _remote(prepare[0])
    script = remote[remote.index("launch/prepare_tfds.py"):]
    assert script == ["launch/prepare_tfds.py", "--config=configs/cifar10.py", f"--data_dir={DATA_DIR}",
                      "--config.train.batch_size=4096", NASTY]

    # train: contrastood.main on every worker, detached, with the workdir on the bucket.
    assert len(train) == 1
    _gcloud_tpu(train[0], "ssh")
    assert _flag(train[0], "worker") == "all"
    remote = _remote(train[0])
    assert remote[:3] == ["cd", "contrastood", "&&"]
    assert remote[3:8] == ["bash", "launch/tpu_worker.sh", "start", "--job=run", "--"]
    assert f"TFDS_DATA_DIR={DATA_DIR}" in remote
    main = remote[remote.index(".venv/bin/python"):]
    assert main == [".venv/bin/python", "-m", "contrastood.main", "--config=configs/cifar10.py",
                    f"--workdir={WORKDIR}", "--mode=train", "--alsologtostderr",
                    "--config.train.batch_size=4096", NASTY]

    # logs from every worker; TensorBoard from worker 0, forwarded; stop; delete.
    assert len(logs) == 1 and _flag(logs[0], "worker") == "all"
    assert _remote(logs[0])[:3] == ["bash", "contrastood/launch/tpu_worker.sh", "logs"]
    assert len(tensorboard) == 1
    _gcloud_tpu(tensorboard[0], "ssh")
    assert _flag(tensorboard[0], "worker") == "0"
    assert tensorboard[0][-4:] == ["--", "-t", "-L", "6006:localhost:6006"]
    assert _remote(tensorboard[0]) == ["cd", "contrastood", "&&", ".venv/bin/python", "-m", "tensorboard.main",
                                       f"--logdir={WORKDIR}", "--host=localhost", "--port=6006"]
    assert _remote(stop[0])[:4] == ["bash", "contrastood/launch/tpu_worker.sh", "stop", "--job=run"]
    assert len(delete) == 1
    _gcloud_tpu(delete[0], "delete")
    assert delete[0][5] == "c10-run" and "--quiet" not in delete[0]

    # `all` is create, install, prepare-data, train, in that order.
    assert dry(fake_bin, "all", *RUN, "--accelerator=v4-32", "--spot") == create + install + prepare + train


def test_dry_run_from_environment(fake_bin):
    """TPU_* variables and DRY_RUN=1 stand in for the flags; flags win over variables."""
    env = dict(TPU_NAME="env-slice", TPU_ZONE="europe-west4-a", TPU_ACCELERATOR="v5litepod-16",
               TPU_BUCKET="gs://bkt", TPU_PREEMPTIBLE="1", DRY_RUN="1", FAKE_GCLOUD="fail")
    result = tpu_vm(fake_bin, "create", **env)
    assert result.returncode == 0, result.stderr
    assert not _calls(fake_bin.parent)
    create = shlex.split(result.stdout.splitlines()[-1])
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "env-slice"]
    assert "--zone=europe-west4-a" in create and "--preemptible" in create
    assert "--version=v2-alpha-tpuv5-lite" in create and not any(a.startswith("--project") for a in create)
    result = tpu_vm(fake_bin, "train", "--name=flag-slice", "--version=x", **env)
    assert result.returncode == 0, result.stderr
    train = shlex.split(result.stdout.splitlines()[0])
    assert train[5] == "flag-slice"
    assert "--workdir=gs://bkt/contrastood/flag-slice" in _remote(train)


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_default_runtime_version(fake_bin, accelerator, version):
    create = dry(fake_bin, "create", *SLICE, f"--accelerator={accelerator}")[-1]
    assert _flag(create, "version") == version
    create = dry(fake_bin, "create", *SLICE, f"--accelerator={accelerator}", "--version=my-runtime")[-1]
    assert _flag(create, "version") == "my-runtime"


def test_dry_run_options(fake_bin):
    train = dry(fake_bin, "train", *SLICE, "--workdir=gs://wbk/run 1", "--data-dir=gs://dbk/tfds",
                "--config=configs/cifar10.py:cpu", "--mode=evaluate", "--attach", "--internal-ip",
                "--", "--jax_debug_nans")[0]
    assert "--internal-ip" in train
    remote = _remote(train)
    assert remote[3:8] == ["bash", "launch/tpu_worker.sh", "run", "--job=run", "--"]
    assert remote[-8:] == [".venv/bin/python", "-m", "contrastood.main", "--config=configs/cifar10.py:cpu",
                           "--workdir=gs://wbk/run 1", "--mode=evaluate", "--alsologtostderr", "--jax_debug_nans"]
    assert "TFDS_DATA_DIR=gs://dbk/tfds" in remote

    prepare = dry(fake_bin, "prepare-data", *RUN, "--local", "--datasets=cifar10,svhn_cropped", "--", "--x")
    assert prepare == [["python3", str(LAUNCH / "prepare_tfds.py"), f"--config={REPO}/configs/cifar10.py",
                        f"--data_dir={DATA_DIR}", "--datasets=cifar10,svhn_cropped",
                        "--config.train.batch_size=4096", NASTY]]

    logs = dry(fake_bin, "logs", *SLICE, "--worker=1", "--lines=7", "--follow", "--output-dir=out dir",
               "--job=prepare-data")[0]
    assert _flag(logs, "worker") == "1" and _flag(logs, "output-directory") == "out dir"
    assert _remote(logs) == ["bash", "contrastood/launch/tpu_worker.sh", "logs", "--job=prepare-data",
                             "--lines=7", "--follow"]
    tensorboard = dry(fake_bin, "tensorboard", *SLICE, f"--workdir={WORKDIR}", "--port=7007")[0]
    assert tensorboard[-2:] == ["-L", "7007:localhost:7007"]
    assert "--port=7007" in _remote(tensorboard)
    assert dry(fake_bin, "delete", *SLICE, "--yes")[0][-1] == "--quiet"
    create = dry(fake_bin, "create", *SLICE, "--accelerator=v4-32",
                 "--create-flag=--service-account=sa@p.iam.gserviceaccount.com", "--create-flag=--labels=a=b")[-1]
    assert create[-2:] == ["--service-account=sa@p.iam.gserviceaccount.com", "--labels=a=b"]


@pytest.mark.parametrize("args, needle", [
    ([], "no command"),
    (["frobnicate", *SLICE], "unknown command 'frobnicate'"),
    (["create", "--zone=us-central2-b", "--accelerator=v4-32"], "--name"),
    (["create", "--name=x", "--accelerator=v4-32"], "--zone"),
    (["create", *SLICE], "--accelerator"),
    (["create", *SLICE, "--accelerator=v9z-8"], "--version"),
    (["create", *SLICE, "--accelerator=tpu"], "--accelerator looks wrong"),
    (["create", *SLICE, "--accelerator=v4-8", "--spot", "--preemptible"], "--spot and --preemptible"),
    (["create", "--name=Bad_Name", "--zone=us-central2-b", "--accelerator=v4-8"], "--name must be"),
    (["train", *SLICE], "--workdir"),
    (["train", *SLICE, "--workdir=/tmp/run"], "gs://"),
    (["train", *SLICE, "--bucket=my-bucket"], "gs://"),
    (["train", *SLICE, "--bucket=gs://bkt", "--config=configs/nope.py"], "no such file"),
    (["train", *SLICE, "--bucket=gs://bkt", "--mode=serve"], "--mode"),
    (["prepare-data", *SLICE], "--data-dir"),
    (["tensorboard", *SLICE], "--workdir"),
    (["all", *SLICE, "--bucket=gs://bkt"], "--accelerator"),
    (["status", *SLICE, "--config.x=1"], "takes no config overrides"),
    (["train", *SLICE, "--bucket=gs://bkt", "--config.x"], "need '='"),
    (["train", *SLICE, "--bucket=gs://bkt", "--frob=1"], "unknown option '--frob'"),
    (["train", *SLICE, "--bucket"], "needs a value"),
    (["logs", *SLICE, "--worker=first"], "--worker"),
])
def test_invalid_arguments_exit_nonzero_with_usage(fake_bin, args, needle):
    for extra in ([], ["--dry-run"]):
        result = tpu_vm(fake_bin, *args, *extra, FAKE_GCLOUD="fail")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert needle in result.stderr
        assert "usage: launch/tpu_vm.sh COMMAND" in result.stderr
        assert result.stdout == ""
    assert not _calls(fake_bin.parent)


def test_dry_run_needs_no_gcloud_but_a_real_run_does(tmp_path):
    bin_dir = tmp_path / "bin"  # only what the script needs besides gcloud
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    args = [shutil.which("bash"), str(TPU_VM), "delete", *SLICE]
    result = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gcloud compute tpus tpu-vm delete c10-run")
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "gcloud not found on PATH" in result.stderr


# ------------------------------------------------------------------------------------------------
# Real runs against a fake gcloud: the same commands as the dry run, and the create logic.
# ------------------------------------------------------------------------------------------------

def test_real_run_matches_dry_run(fake_bin, tmp_path):
    scp_dir = tmp_path / "scp"
    scp_dir.mkdir()
    for command in (["install", *SLICE], ["train", *RUN], ["prepare-data", *RUN], ["delete", *SLICE, "--yes"]):
        expected = dry(fake_bin, *command)
        (tmp_path / "calls.jsonl").unlink(missing_ok=True)
        result = tpu_vm(fake_bin, *command, FAKE_SCP_DIR=str(scp_dir))
        assert result.returncode == 0, result.stderr
        assert _calls(tmp_path) == expected
        for argv in expected:  # and it echoes each one
            assert "+ " + shlex.join(argv)[:20] in result.stderr
    # The tarball install copied: the working tree (tracked and untracked), nothing ignored.
    (tarball,) = scp_dir.iterdir()
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "configs", "contrastood/configs/cifar10.py", "launch/tpu_worker.sh", "launch/prepare_tfds.py",
            "contrastood/main.py", "tests/test_launch.py"} <= names
    assert not any(n.startswith(".git/") or "__pycache__" in n or n.endswith(".egg-info") for n in names)
    assert not (tmp_path / "contrastood-c10-run.tar.gz").exists(), "the local tarball was not removed"


@pytest.mark.parametrize("state, expected", [
    (None, ["describe", "create"]),
    ("READY", ["describe"]),
    ("CREATING", ["describe"]),
    ("PREEMPTED", ["describe", "delete", "create"]),
    ("TERMINATED", ["describe", "delete", "create"]),
])
def test_create_is_idempotent(fake_bin, tmp_path, state, expected):
    env = {"FAKE_STATE": state} if state else {}
    result = tpu_vm(fake_bin, "create", *SLICE, "--accelerator=v4-32", "--spot", **env)
    assert result.returncode == 0, result.stderr
    calls = _calls(tmp_path)
    assert [c[4] for c in calls] == expected
    if "delete" in expected:
        assert "--quiet" in calls[1]
    if "create" in expected:
        assert calls[-1][5:] == ["c10-run", "--zone=us-central2-b", "--project=my-proj",
                                 "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


def test_gcloud_failure_stops_the_workflow(fake_bin, tmp_path):
    result = tpu_vm(fake_bin, "all", *RUN, "--accelerator=v4-32", FAKE_GCLOUD="fail")
    assert result.returncode == 97
    assert [c[4] for c in _calls(tmp_path)] == ["describe", "create"]


# ------------------------------------------------------------------------------------------------
# The remote side: run the printed --command strings in a shell, in a fake worker home.
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def worker_home(tmp_path):
    """A worker: HOME and a fake `python3` that records argv, cwd and TFDS_DATA_DIR, then exits $FAKE_RC;
    `python3 -m uv venv ... DIR` makes DIR/bin/python, a copy of the fake."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "python3", f"""#!{sys.executable}
import json, os, shutil, sys
with open({str(tmp_path / "python3.jsonl")!r}, "a") as f:
    f.write(json.dumps({{"exe": sys.argv[0], "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR")}}) + "\\n")
if sys.argv[1:4] == ["-m", "uv", "venv"]:
    os.makedirs(os.path.join(sys.argv[-1], "bin"))
    shutil.copy(sys.argv[0], os.path.join(sys.argv[-1], "bin", "python"))
print("fake python3 ran", flush=True)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
""")
    env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "CONTRASTOOD_WORKER_ID": "0"}
    return home, env


def _on_worker(command, home, env, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=home, env={**env, **extra}, capture_output=True,
                          text=True, timeout=60)


def test_remote_commands_run_on_a_worker(fake_bin, tmp_path, worker_home):
    home, env = worker_home
    scp_dir = tmp_path / "scp"
    scp_dir.mkdir()
    assert tpu_vm(fake_bin, "install", *SLICE, FAKE_SCP_DIR=str(scp_dir)).returncode == 0
    (tarball,) = scp_dir.iterdir()
    shutil.copy(tarball, home / "contrastood.tar.gz")
    install, = [c for c in dry(fake_bin, "install", *SLICE) if c[4] == "ssh"]
    result = _on_worker(_flag(install, "command"), home, env)
    assert result.returncode == 0, result.stderr
    assert (home / "contrastood" / "launch" / "tpu_worker.sh").exists()
    assert not (home / "contrastood.tar.gz").exists() and not (home / "contrastood.new").exists()
    pip = [json.loads(line) for line in (tmp_path / "python3.jsonl").read_text().splitlines()]
    assert [p["argv"] for p in pip] == [
        ["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"],
        ["-m", "uv", "venv", "--python", "3.11", ".venv"],
        ["-m", "uv", "pip", "install", "--python", ".venv/bin/python", "-e", ".", "jax[tpu]"]]
    assert {p["cwd"] for p in pip} == {str(home / "contrastood")}
    assert (home / "contrastood" / ".venv" / "bin" / "python").exists()
    (tmp_path / "python3.jsonl").unlink()

    # train --attach: runs contrastood.main through tpu_worker.sh and waits; every argument survives.
    train, = dry(fake_bin, "train", *RUN, "--attach")
    result = _on_worker(_flag(train, "command"), home, env)
    assert result.returncode == 0, result.stderr
    assert "fake python3 ran" in result.stdout
    (call,) = [json.loads(line) for line in (tmp_path / "python3.jsonl").read_text().splitlines()]
    assert call["argv"] == ["-m", "contrastood.main", "--config=configs/cifar10.py", f"--workdir={WORKDIR}",
                            "--mode=train", "--alsologtostderr", "--config.train.batch_size=4096", NASTY]
    assert call["TFDS_DATA_DIR"] == DATA_DIR and call["cwd"] == str(home / "contrastood")
    assert call["exe"] == ".venv/bin/python"
    log = (home / "contrastood-logs" / "run-worker-0.log").read_text()
    assert "fake python3 ran" in log and "exited with status 0" in log

    # A failing run's status comes back through --attach; status and logs report it.
    result = _on_worker(_flag(train, "command"), home, env, FAKE_RC="143")
    assert result.returncode == 143
    status, = dry(fake_bin, "status", *SLICE)
    result = _on_worker(_flag(status, "command"), home, env)
    assert "job 'run' exited with status 143" in result.stdout
    logs, = dry(fake_bin, "logs", *SLICE, "--lines=1")
    result = _on_worker(_flag(logs, "command"), home, env)
    assert result.stdout.splitlines()[-1].endswith("exited with status 143 (SIGTERM: checkpoint saved; "
                                                   "rerun to resume)")


# ------------------------------------------------------------------------------------------------
# tpu_worker.sh: detached jobs, one at a time, SIGTERM -> 143 recorded, install refused meanwhile.
# ------------------------------------------------------------------------------------------------

JOB = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("SIGTERM: checkpointing", flush=True), sys.exit(143)))
print("args", sys.argv[1:], flush=True)
for step in range(int(sys.argv[1])):
    print("step", step, flush=True)
    time.sleep(0.1)
"""


def worker(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTRASTOOD_LOG_DIR": str(tmp_path / "logs"), "CONTRASTOOD_WORKER_ID": "5"}
    return subprocess.run(["bash", str(WORKER), *args], capture_output=True, text=True, env=env, timeout=60)


def test_worker_start_stop_resume(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(JOB)
    log = tmp_path / "logs" / "run-worker-5.log"
    started = worker(tmp_path, "start", "--", sys.executable, str(job), "600", "a b'c")
    assert started.returncode == 0, started.stderr
    assert "started job 'run'" in started.stderr
    deadline = time.time() + 20
    while "step 1" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, "the detached job did not start"
        time.sleep(0.1)
    assert "running (pid" in worker(tmp_path, "status").stdout
    second = worker(tmp_path, "start", "--", sys.executable, str(job), "1")
    assert second.returncode == 3 and "not starting a second one" in second.stderr
    assert worker(tmp_path, "check-idle").returncode == 1

    stopped = worker(tmp_path, "stop", "--timeout=20")
    assert stopped.returncode == 0, stopped.stderr
    assert "exited with status 143" in stopped.stdout
    text = log.read_text()
    assert "args ['600', \"a b'c\"]" in text and "SIGTERM: checkpointing" in text
    assert "exited with status 143 (SIGTERM: checkpoint saved; rerun to resume)" in text
    assert worker(tmp_path, "check-idle").returncode == 0

    # Rerun (attached): a new run appended to the same log, its exit status returned.
    rerun = worker(tmp_path, "run", "--", sys.executable, str(job), "2")
    assert rerun.returncode == 0, rerun.stderr
    assert "step 1" in rerun.stdout and "args ['600'" not in rerun.stdout
    assert log.read_text().count("starting:") == 2
    failed = worker(tmp_path, "run", "--job=other", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert failed.returncode == 7
    assert "job 'other' exited with status 7" in worker(tmp_path, "status", "--job=other").stdout
    assert "not started" in worker(tmp_path, "status", "--job=never").stdout


def test_worker_rejects_bad_arguments(tmp_path):
    assert worker(tmp_path, "start").returncode == 2
    assert worker(tmp_path, "frob").returncode == 2
    assert worker(tmp_path, "logs", "--job=../x").returncode == 2


# ------------------------------------------------------------------------------------------------
# prepare_tfds.py --list: which TFDS datasets a config needs (no TensorFlow, no network).
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, overrides, names", [
    ("configs/cifar10.py", [], {"cifar10", "cifar100", "svhn_cropped", "places365_small"}),
    ("configs/cifar10.py:cpu", [], {"cifar10"}),
    ("configs/cifar10.py:cpu", ["--config.data.train=tfds:mnist:3.0.1:train[:90%]#classes=0-5"],
     {"mnist:3.0.1", "cifar10"}),
    ("configs/clp_cifar10.py", [], {"cifar10", "cifar100", "svhn_cropped", "places365_small"}),
    ("configs/digits.py", [], set()),
])
def test_prepare_tfds_lists_the_config_datasets(config, overrides, names, tmp_path):
    result = subprocess.run([sys.executable, str(LAUNCH / "prepare_tfds.py"), f"--config={REPO}/{config}",
                             *overrides, "--list"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == names
    assert "tensorflow" not in result.stderr.lower()


def test_prepare_tfds_builds_into_the_data_dir(tmp_path):
    """The build path, against a stand-in `tensorflow_datasets` module (no TensorFlow, no download)."""
    fake = tmp_path / "fake" / "tensorflow_datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"""
import json, types
def builder(name, data_dir, file_format):
    def download_and_prepare(download_dir):
        with open({str(tmp_path / "built.jsonl")!r}, "a") as f:
            f.write(json.dumps([name, data_dir, download_dir, file_format]) + "\\n")
    split = types.SimpleNamespace(num_examples=3)
    return types.SimpleNamespace(download_and_prepare=download_and_prepare,
                                 info=types.SimpleNamespace(splits={{"test": split}}))
""")
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "TFDS_DATA_DIR": "gs://env-bucket/tfds"}

    def prepare(*args):
        return subprocess.run([sys.executable, str(LAUNCH / "prepare_tfds.py"), *args, "--download_dir=/tmp/dl"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=120)

    result = prepare("--config=configs/cifar10.py:cpu", "--data_dir=gs://flag-bucket/tfds")
    assert result.returncode == 0, result.stderr
    assert "all 1 datasets ready in gs://flag-bucket/tfds" in result.stdout
    result = prepare("--datasets=svhn_cropped,mnist")  # --data_dir unset: $TFDS_DATA_DIR
    assert result.returncode == 0, result.stderr
    result = prepare("--config=configs/cifar10.py:cpu", "--config.data.data_dir=gs://cfg-bucket/tfds",
                     "--data_dir=gs://flag-bucket/tfds")  # as in training, the config's data_dir wins
    assert result.returncode == 0, result.stderr
    built = [json.loads(line) for line in (tmp_path / "built.jsonl").read_text().splitlines()]
    assert built == [["cifar10", "gs://flag-bucket/tfds", "/tmp/dl", "array_record"],
                     ["svhn_cropped", "gs://env-bucket/tfds", "/tmp/dl", "array_record"],
                     ["mnist", "gs://env-bucket/tfds", "/tmp/dl", "array_record"],
                     ["cifar10", "gs://cfg-bucket/tfds", "/tmp/dl", "array_record"]]
