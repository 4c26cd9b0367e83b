"""Test setup: 8 forced CPU devices so multi-device code paths run on any machine.

XLA_FLAGS must be set before JAX initialises its backends, so it happens at import time here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (real CIFAR-10, Tiny ImageNet, DTD arrays); skips if absent."""
    if not (SHARED_DATA / "cifar10-test.npz").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
