"""Test setup: 8 forced CPU devices so multi-device code paths run on any machine, and a persistent
XLA compilation cache (most of a small test's time is compilation).

XLA_FLAGS must be set before JAX initialises its backends, so it happens at import time here. The
variables are inherited by the subprocesses the tests start, so they share the cache too; set
CONTRASTOOD_TEST_XLA_CACHE= (empty) to run without it.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The XLA:CPU option set is pinned for the suite (tests/test_perf.py measures the choice itself), so
# that every small test workload does not measure the candidates first.
os.environ.setdefault("CONTRASTOOD_XLA_CPU_OPTIONS", "ynn_reduce_eltwise")
# Likewise Winograd takes its fixed rule: a choice measured by one test (benchmarks run as subprocesses) or by an
# earlier run on this machine must not change which kernels another test compiles. tests/test_onednn_conv.py and
# tests/test_train.py measure the choice itself, in their own cache directories.
os.environ.setdefault("CONTRASTOOD_CONV_LAYER_TUNING", "0")
_CACHE = os.environ.get("CONTRASTOOD_TEST_XLA_CACHE",
                        str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_xla_cache"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Before any test starts JAX's CPU client (contrastood.host_memory): the suite's data is in memory.
from contrastood import host_memory  # noqa: E402

host_memory.configure()

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (real CIFAR-10, Tiny ImageNet, DTD arrays); skips if absent."""
    if not (SHARED_DATA / "cifar10-test.npz").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
