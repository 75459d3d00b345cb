"""The source texts' worked examples as reproducible figures, one small function per figure.

    python -m experiments.figures --list
    python -m experiments.figures --figure=NAME --workdir=DIR [--quick] [--checkpoint_dir=RUN]
    python -m experiments.figures --figure=all --workdir=DIR

Each figure computes its numbers with the library (``diffusion.*``), checks them against their exact
counterparts, and writes DIR/NAME.png with the numbers behind it in DIR/NAME.json (see ``base``).
Sources: Higham, Higham & Grindrod 2023, "Diffusion Models for Generative AI: An Introduction for
Applied Mathematicians"; Chan 2024, "Tutorial on Diffusion Models for Imaging and Vision"; the survey
"On the Design Fundamentals of Diffusion Models".
"""

# Importing a figure module registers its figures.
from experiments.figures import (  # noqa: F401
    ddpm_experiment,
    forward,
    guidance_sweeps,
    indi,
    pde,
    schedules,
    score_matching,
    scores,
    sde,
)
from experiments.figures.base import FIGURES, Figure, FigureContext, run_figure

# The order of --list and --figure=all: the texts' order, the trained-model figure last.
ORDER = (
    "forward_process",
    "scores_langevin",
    "score_matching",
    "sde_demos",
    "indi",
    "pde",
    "schedules",
    "guidance_sweeps",
    "ddpm_experiment",
)
_registered = dict(FIGURES)
FIGURES.clear()
FIGURES.update({name: _registered.pop(name) for name in ORDER if name in _registered})
FIGURES.update(_registered)

__all__ = ["FIGURES", "Figure", "FigureContext", "run_figure"]
