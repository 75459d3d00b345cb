"""benchmarks/accelerator.sh at its --small size on CPU: it runs the throughput, memory and
training-run benchmarks and merges them into one JSON file with the documented fields."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about 2 minutes on a 2-core CPU
def test_accelerator_script_small_run_writes_one_json(tmp_path):
    output = tmp_path / "accelerator.json"
    environment = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    # One host device, as a user's shell would have (the test session simulates four).
    environment["XLA_FLAGS"] = ""
    subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--small", str(output)],
        cwd=ROOT,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    merged = json.loads(output.read_text())
    assert merged["small"] is True
    (throughput,) = merged["throughput"]["records"]
    assert throughput["config"] == "vp_digits"
    for key in ("examples_per_s", "flops_per_step", "achieved_flops_per_s", "utilization"):
        assert throughput[key] > 0
    assert merged["throughput"]["machine"]["platform"] == "cpu"
    cases = {record["case"]: record for record in merged["memory"]["records"]}
    assert set(cases) == {"train", "sample"}
    assert all(
        record["peak_rss_bytes"] > record["rss_after_setup_bytes"] > 0 for record in cases.values()
    )
    assert cases["sample"]["num_samples"] == 64 and cases["sample"]["finite"]
    run = merged["training_run"]
    assert run["steps"] == 20 and run["steps_per_s"] > 0
    assert run["last_loss"] < run["first_loss"]  # 20 Adam steps at vp_digits' rate reduce the loss
