"""DDPM, SMLD/NCSN and score SDEs as one model family.

Every forward process is linear-Gaussian, x_t = alpha(t) x_0 + sigma(t) eps (see ``processes``); what a
network predicts is one of several affine views of a single denoiser (see ``parameterization``); a
solver turns a denoiser, a process and a time grid into samples (see ``samplers``).
"""

__version__ = "0.1.0"
