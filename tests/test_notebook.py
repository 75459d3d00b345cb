"""The Colab notebook runs top to bottom on the toy config (executed with nbclient)."""

import os
import tomllib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "solver_sweep.ipynb")


@pytest.mark.slow
def test_solver_sweep_notebook_executes_on_the_toy_config(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if c.source.startswith("# Parameters"))
    parameters.source = "\n".join(
        [
            "# Parameters (test values)",
            'CONFIG = "toy_vp"',
            f'WORKDIR = "{tmp_path}/run"',
            "TRAIN_STEPS = 100",
            'SOLVERS = ("ddim", "unipc")',
            "NFES = (10,)",
            'GRIDS = ("uniform_log_snr",)',
            "NUM_SAMPLES = 64",
            "TRAJECTORY_NFE = 5",
            'FLOW_CONFIG = "toy_flow"',
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    )
    client.execute(env=env)
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "best at 10 NFE:" in outputs
    assert "dpm_solver_pp_3m_sde(eta=0) vs dpm_solver_pp_3m" in outputs
    for name in ("sweep", "exact_sweep", "exact_sweep_vs_time", "flow_sweep"):
        assert os.path.exists(os.path.join(tmp_path, "run", f"notebook_{name}.png")), name


def test_the_notebook_installs_from_the_repository_url_of_pyproject():
    """The URL is stated once, in pyproject.toml; the notebook's install cell must name the same."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        url = tomllib.load(file)["project"]["urls"]["Repository"]
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    install = notebook.cells[1].source
    assert f'REPOSITORY = "{url}"' in install
    assert "git+{REPOSITORY}" in install and "DIFFUSION_REPOSITORY" not in install
