"""Shared test setup.

The test session simulates 4 CPU devices (set before JAX is imported) so that pmap and sharded-jit
tests run anywhere; computations on unsharded arrays still use device 0. Tests that need float64
request the ``x64`` fixture (never enable it globally).
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()

import jax  # after XLA_FLAGS, so that the flag takes effect
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (convergence orders and exact identities need them)."""
    with jax.enable_x64(True):
        yield
