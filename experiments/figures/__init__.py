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

# Importing a figure module registers its figures, in the order of this list.
from experiments.figures import forward, indi, pde, score_matching, scores, sde  # noqa: F401
from experiments.figures.base import FIGURES, Figure, FigureContext, run_figure

__all__ = ["FIGURES", "Figure", "FigureContext", "run_figure"]
