"""Shared fixtures. Tests that need float64 request the ``x64`` fixture (never enable it globally)."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (convergence orders and exact identities need them)."""
    with jax.enable_x64(True):
        yield
