"""contrastood.host_memory: on a CPU backend, glibc reuses XLA's freed step buffers instead of faulting
fresh pages in on every step. Each case runs in a fresh interpreter, because the settings only take
effect before JAX starts its CPU client."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

# The tiny ResNet's forward and backward pass under the package's XLA:CPU options: its buffers are far
# above glibc's mmap threshold (about 51,000 pages, 200 MiB, fault in per step without the settings).
# Minor page faults count the fresh pages.
_STEP = r"""
import json, resource
{prelude}
from contrastood import host_memory
host_memory.configure()
import jax, jax.numpy as jnp
from contrastood import models, perf

model = models.ContrastiveResNet(stage_sizes=(1, 1, 1), block_cls=models.BasicBlock, num_classes=10,
                                 base_filters=16)
x = jnp.linspace(0.0, 1.0, 128 * 32 * 32 * 3, dtype=jnp.float32).reshape(128, 32, 32, 3)
variables = model.init(jax.random.PRNGKey(0), x[:2], train=True)

def loss(params, x):
    out, _ = model.apply({{"params": params, "batch_stats": variables["batch_stats"]}}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out["logits"] ** 2)

step = jax.jit(jax.grad(loss), compiler_options=perf.CPU_COMPILER_OPTIONS)
for _ in range(4):  # the heap settles in a few steps
    jax.block_until_ready(step(variables["params"], x))
faults = []  # per step, in three windows of two steps: the fewest is the settled heap's
for _ in range(3):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        jax.block_until_ready(step(variables["params"], x))
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 2)
print(json.dumps({{"faults_per_step": min(faults), "windows": faults, **host_memory.state}}))
"""


def _run(prelude="", **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CONTRASTOOD_HOST_MALLOC")}
    environment.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env})
    out = subprocess.run([sys.executable, "-c", _STEP.format(prelude=prelude)], env=environment,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cpu_step_stops_faulting_its_buffers_in_again():
    on = _run()
    off = _run(CONTRASTOOD_HOST_MALLOC="0")
    assert on["applied"] and "one arena" in on["reason"], on
    assert not off["applied"] and off["reason"] == "CONTRASTOOD_HOST_MALLOC=0", off
    # Without the settings each step faults its buffers in again (about 50k 4-KiB pages measured);
    # with them, once the heap has settled, none (0 to 0.3 measured).
    assert off["faults_per_step"] > 10_000, off
    assert on["faults_per_step"] < 100, (on, off)


def test_it_stands_aside_where_it_cannot_act_or_does_not_pay():
    started = _run(prelude="import jax; jax.devices()")
    assert not started["applied"] and "already started" in started["reason"], started
    tuned = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert not tuned["applied"] and "GLIBC_TUNABLES" in tuned["reason"], tuned


def test_an_accelerator_backend_keeps_glibc_defaults():
    probe = ("import json; from contrastood import host_memory; "
             "print(json.dumps(host_memory.configure()))")
    for platforms in ("cuda", "tpu", "cuda,cpu"):
        env = {**os.environ, "JAX_PLATFORMS": platforms}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        state = json.loads(out.stdout.strip().splitlines()[-1])
        assert not state["applied"] and "accelerator" in state["reason"], (platforms, state)


def test_runs_that_decode_on_host_threads_keep_glibc_defaults():
    """One arena slowed a folder run (decode threads share XLA's malloc lock), so main leaves it out there."""
    from contrastood import host_memory
    from contrastood.configs import cifar10, digits, folder

    assert host_memory.decodes_on_host(folder.get_config("cpu,path=/data/images"))
    assert not host_memory.decodes_on_host(digits.get_config(""))
    config = cifar10.get_config("")
    assert not host_memory.decodes_on_host(config)
    config.data.crop = "host"
    assert host_memory.decodes_on_host(config)
    config.data.crop = "auto"
    config.data.unlabelled = "folder:/data/extra:train"
    assert host_memory.decodes_on_host(config)
    config.data.unlabelled = "bogus:spec"  # reported by the run itself, later
    assert not host_memory.decodes_on_host(config)
    state = _run(prelude="from contrastood import host_memory; host_memory.configure(host_decoding=True)")
    assert not state["applied"] and "host threads" in state["reason"], state
