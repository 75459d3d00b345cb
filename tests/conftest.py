"""Shared test setup.

Tiers: ``-m "not slow"`` (the fast tier) runs every test function once, on its first parameter set
that is not marked slow; the other parameter sets (every process, sampler, config of a cross
product) and the tests marked slow (statistics, training) run in the full suite only.

The test session simulates 4 CPU devices (set before JAX is imported) so that shard_map and sharded-jit
tests run anywhere; computations on unsharded arrays still use device 0. Tests that need float64
request the ``x64`` fixture (never enable it globally).
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()

import gc
import gzip
import struct
import subprocess
import sys
import tempfile

import jax  # after XLA_FLAGS, so that the flag takes effect
import numpy as np
import pytest

_CACHE_VARIABLE = "DIFFUSION_TESTS_COMPILATION_CACHE"
# Programs that several tests compile identically (e.g. one network under three configs that differ
# only in their data source) are compiled once per session and then read from this cache. The
# session's first process makes it and passes it on to pytest-xdist's workers (-n 2) through the
# environment, so that the workers share it too; that process removes it at exit.
if _CACHE_VARIABLE not in os.environ:
    _COMPILATION_CACHE = tempfile.TemporaryDirectory(prefix="jax-compilation-cache-")
    os.environ[_CACHE_VARIABLE] = _COMPILATION_CACHE.name
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(num_devices: int | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: this machine's real devices, or ``num_devices`` CPUs."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def run_cli(*arguments: str, timeout: float = 600, num_devices: int | None = None):
    """``python -m experiments.run ARGUMENTS`` in the repository; the CompletedProcess."""
    command = [sys.executable, "-m", "experiments.run", *arguments]
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(num_devices),
    )


IDX_BIG_ENDIAN = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}


def write_idx_file(path, array: np.ndarray, type_code: int = 0x08) -> None:
    """Write an IDX file by hand from the format description (magic, dims, big-endian data)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_BIG_ENDIAN[type_code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(payload)


def write_mnist_like_idx(directory, num_train: int = 16, num_test: int = 8, seed: int = 0) -> str:
    """Random 28x28 uint8 digits with labels 0..9 as the four MNIST IDX files in ``directory``."""
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx_file(f"{directory}/{prefix}-images-idx3-ubyte.gz", images)
        write_idx_file(f"{directory}/{prefix}-labels-idx1-ubyte.gz", labels)
    return str(directory)


def pytest_collection_modifyitems(config, items):
    """Mark every parameter set of a test function after its first fast one as slow (the tiers
    of the module docstring), so that the fast tier covers each test function and each module."""
    seen = set()
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        function = (item.path, getattr(item, "originalname", item.name))
        if function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program when a test module ends. JAX keeps each jitted function's
    executables (and the networks and processes they were traced with) for the life of the
    process, so over the ~1,200 tests the suite's memory would only grow; programs shared between
    modules come back from the persistent cache above."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (convergence orders and exact identities need them)."""
    with jax.enable_x64(True):
        yield
