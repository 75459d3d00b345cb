"""Time grids for samplers: decreasing arrays of num_steps + 1 times from t_start down to t_end.

Continuous grids (any process):

* 'uniform_t': uniform in t (Song et al. 2021);
* 'uniform_log_snr': uniform in the half log-SNR lambda (Lu et al. 2022, "DPM-Solver", Sec. 3.3,
  'logSNR');
* 'quadratic_t': uniform in sqrt(t) (Lu et al. 2022, 'time_quadratic'; Song, Meng & Ermon 2021, DDIM
  'quad');
* 'karras': the rho-grid of Karras et al. 2022 (eq. 5) in sigma_hat = sigma / alpha = exp(-lambda),
  sigma_i = (sigma_max^{1/rho} + i/N (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho, mapped back to t
  through the process's t(lambda); for the EDM process (sigma = t) this is exactly their grid.
* 'flow_t': the rectified flow's grid carried to any process. Every process here has the same
  probability-flow ODE in sigma_hat = sigma / alpha (Song et al. 2021, eq. 13 with x / alpha; Karras
  et al. 2022, Sec. 3), and the rectified flow x_t = (1 - t) x0 + t eps (Liu et al. 2022) reaches
  sigma_hat at s = sigma_hat / (1 + sigma_hat) = sigma / (alpha + sigma). The grid is uniform in
  s^(1/rho): rho = 1 is uniform in flow time, the grid flow models are sampled on (Lipman et al.
  2022); rho = 2 (the default) is the flow's 'quadratic_t'. On the rectified flow (shift 1) it is
  'uniform_t' (rho = 1) or 'quadratic_t' (rho = 2) exactly; on other processes it puts the same
  noise levels where the flow would (docs/references.md#noise-levels-and-time-grids).

Index grids (discrete chains only: DDPM, SMLD), selecting num_steps + 1 of the chain's states as in
Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed", Table 2):
'linspace' (rounded linspace over the indices, which for num_steps + 1 = N is the whole chain),
'leading' (DDIM's uniform stride from index 0) and 'trailing' (uniform stride ending at the last
index).

Default end points: t_start = T and t_end = ``process.sampling_t_end`` (score_sde: 1e-3 for VP / sub-VP,
1e-5 for VE). A final denoising step to sigma = 0 is an option of the samplers, not of the grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffusion.processes import Process

__all__ = [
    "CONTINUOUS_GRIDS",
    "DEFAULT_RHO",
    "GRIDS",
    "INDEX_GRIDS",
    "chain_indices",
    "shared_grid_arguments",
    "time_grid",
]

CONTINUOUS_GRIDS = ("uniform_t", "uniform_log_snr", "quadratic_t", "karras", "flow_t")
INDEX_GRIDS = ("linspace", "leading", "trailing")
GRIDS = CONTINUOUS_GRIDS + INDEX_GRIDS
# The grids shaped by an exponent rho, and its default for each (Karras et al. 2022, eq. 5: rho = 7).
DEFAULT_RHO = {"karras": 7.0, "flow_t": 2.0}


def chain_indices(num_chain_steps: int, kind: str, num_steps: int) -> np.ndarray:
    """num_steps + 1 distinct 0-based chain indices in decreasing order (Lin et al. 2024, Table 2)."""
    count = num_steps + 1
    if not 1 <= num_steps < num_chain_steps:
        raise ValueError(
            f"an index grid of num_steps={num_steps} needs 1 <= num_steps <= "
            f"{num_chain_steps - 1} (the chain has {num_chain_steps} states)"
        )
    if kind == "linspace":
        indices = np.round(np.linspace(0, num_chain_steps - 1, count)).astype(int)
    elif kind == "leading":
        indices = np.arange(count) * (num_chain_steps // count)
    elif kind == "trailing":
        indices = np.round(np.arange(num_chain_steps, 0, -num_chain_steps / count)).astype(int) - 1
    else:
        raise ValueError(f"unknown index grid {kind!r}; accepted: {', '.join(INDEX_GRIDS)}")
    return np.sort(indices)[::-1]


def shared_grid_arguments(
    kind: str, *, t_start: float | None = None, t_end: float | None = None, rho: float | None = None
) -> dict:
    """``time_grid``'s keyword arguments for ``kind`` out of those that a sweep over several grids
    shares: index grids fix their own end points (the chain's), and rho goes only to the grids it
    shapes."""
    if kind in INDEX_GRIDS:
        return {}
    return {"t_start": t_start, "t_end": t_end, "rho": rho if kind in DEFAULT_RHO else None}


def time_grid(
    process: Process,
    kind: str,
    num_steps: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float | None = None,
) -> Array:
    """A decreasing grid of ``num_steps + 1`` times of ``kind`` (see the module docstring); ``rho``
    shapes the 'karras' and 'flow_t' grids (None: ``DEFAULT_RHO``).

    Raises ValueError, before anything compiles, for an unknown kind, num_steps < 1, end points outside
    [t_min, T] or not decreasing, a rho <= 0 or given to a grid without one, or an index grid on a
    process without a discrete chain.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; accepted: {', '.join(GRIDS)}")
    if rho is not None and kind not in DEFAULT_RHO:
        raise ValueError(
            f"rho={rho!r} shapes only the {' and '.join(DEFAULT_RHO)} grids, not {kind!r}: leave it None"
        )
    rho = DEFAULT_RHO.get(kind) if rho is None else float(rho)
    if rho is not None and not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if kind in INDEX_GRIDS:
        if not process.is_discrete:
            raise ValueError(
                f"the index grid {kind!r} needs a discrete chain (DDPM or SMLD); "
                f"{type(process).__name__} has none: use one of {', '.join(CONTINUOUS_GRIDS)}"
            )
        if t_start is not None or t_end is not None:
            raise ValueError(f"the index grid {kind!r} takes no t_start / t_end")
        indices = chain_indices(len(process.chain_times), kind, int(num_steps))
        return jnp.asarray(process.chain_times[indices])

    t_start = process.T if t_start is None else float(t_start)
    t_end = process.sampling_t_end if t_end is None else float(t_end)
    process.check_times(t_start, t_end)
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end, got t_start={t_start!r}, t_end={t_end!r}")
    fractions = jnp.linspace(0.0, 1.0, num_steps + 1)
    if kind == "uniform_t":
        times = t_start + fractions * (t_end - t_start)
    elif kind == "quadratic_t":
        times = (math.sqrt(t_start) + fractions * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2
    elif kind == "uniform_log_snr":
        lam_start, lam_end = process.log_snr(t_start), process.log_snr(t_end)
        times = process.t_from_log_snr(lam_start + fractions * (lam_end - lam_start))
    elif kind == "karras":
        inv_max = jnp.exp(-process.log_snr(t_start) / rho)  # sigma_hat_max^(1/rho)
        inv_min = jnp.exp(-process.log_snr(t_end) / rho)
        sigma_hat = (inv_max + fractions * (inv_min - inv_max)) ** rho
        times = process.t_from_log_snr(-jnp.log(sigma_hat))
    else:  # flow_t: s = sigma / (alpha + sigma) = sigmoid(-lambda), the rectified flow's time
        s_start, s_end = (
            jax.nn.sigmoid(-process.log_snr(t)) ** (1 / rho) for t in (t_start, t_end)
        )
        s = (s_start + fractions * (s_end - s_start)) ** rho
        times = process.t_from_log_snr(jnp.log1p(-s) - jnp.log(s))  # lambda = log((1 - s) / s)
    # Pin the end points exactly (the inverse maps are exact only to rounding).
    return times.at[0].set(t_start).at[-1].set(t_end)
