"""Forward processes: every one is x_t = alpha(t) x_0 + sigma(t) eps with eps ~ N(0, I).

A process is defined by two closed forms, ``log_alpha(t)`` and ``log_sigma(t)`` on [t_min, T]. Everything
else is derived here, once, for all processes:

* the drift coefficient f(t) = d log alpha / dt and the squared diffusion
  g(t)^2 = d sigma^2/dt - 2 f sigma^2 of the SDE dx = f(t) x dt + g(t) dW whose marginals these are
  (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 5; Kingma et al. 2021,
  "Variational Diffusion Models", Appendix A);
* the half log-SNR lambda(t) = log(alpha/sigma) and its inverse t(lambda) (Lu et al. 2022,
  "DPM-Solver", Section 3.1);
* the transition q(x_t | x_s) and the posterior q(x_s | x_t, x_0) between any two times s < t, which is
  what ancestral sampling of any process needs (Ho et al. 2020, eqs. 6-7; Kingma et al. 2021, eqs. 2-4);
* the prior N(0, prior_std^2 I) and its log-density.

Conventions. Times are floats; every function is elementwise in t (scalars or arrays). The noise
level of a process is sigma(t); for VE-type processes (alpha = 1) sigma(t_min) > 0, so the t = t_min
marginal is the data plus a little noise, as in score_sde (see ``VESDE``). Discrete chains (DDPM, SMLD)
are processes too: their continuous view interpolates log alpha (DDPM) or is exactly the VE SDE
(SMLD), and their chain states sit at ``chain_times``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from diffusion.shapes import expand_to, sum_except_batch

__all__ = [
    "DDPM",
    "EDM",
    "PROCESSES",
    "SMLD",
    "VESDE",
    "VPSDE",
    "CosineVP",
    "Process",
    "RectifiedFlow",
    "SubVPSDE",
    "make_process",
]


def _as_float(t: ArrayLike) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


def _time_derivative(fn, t: ArrayLike) -> Array:
    """d fn(t) / dt for an elementwise function of t, by forward-mode autodiff."""
    t = _as_float(t)
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _log_alpha_from_vp_log_snr(log_snr: ArrayLike) -> Array:
    """log alpha of a variance-preserving process (alpha^2 + sigma^2 = 1) with half log-SNR lambda.

    alpha^2 = sigmoid(2 lambda), so log alpha = -1/2 log(1 + exp(-2 lambda)) (Lu et al. 2022, App. D).
    """
    return -0.5 * jnp.logaddexp(0.0, -2.0 * _as_float(log_snr))


def _log_sigma_vp(log_alpha: Array) -> Array:
    """log sigma = 1/2 log(1 - alpha^2), written with expm1 so that it is exact as alpha -> 1."""
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_time_interval(name: str, t_min: float, T: float) -> None:
    _require(
        math.isfinite(t_min) and math.isfinite(T) and 0.0 <= t_min < T,
        f"{name}: need 0 <= t_min < T, got t_min={t_min!r}, T={T!r}",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Process(abc.ABC):
    """A linear-Gaussian forward process x_t = alpha(t) x_0 + sigma(t) eps on [t_min, T].

    Subclasses are frozen (hashable) dataclasses that define ``log_alpha``, ``log_sigma``, the time
    interval ``t_min``/``T`` and ``sampling_t_end``; they may override ``t_from_log_snr`` and
    ``prior_std`` with closed forms. Everything else is derived here.
    """

    name: ClassVar[str]
    t_min: float
    T: float

    # ----------------------------------------------------------------------------- what defines it
    @abc.abstractmethod
    def log_alpha(self, t: ArrayLike) -> Array:
        """log alpha(t): log of the signal scale."""

    @abc.abstractmethod
    def log_sigma(self, t: ArrayLike) -> Array:
        """log sigma(t): log of the noise scale."""

    @property
    @abc.abstractmethod
    def sampling_t_end(self) -> float:
        """Default end time of sampling (score_sde: 1e-3 for VP / sub-VP, 1e-5 for VE)."""

    # ----------------------------------------------------------------------------- discrete chains
    @property
    def chain_times(self) -> np.ndarray | None:
        """Times of the states x_1 .. x_N of a discrete chain (DDPM, SMLD), increasing; None for a
        continuous process."""
        return None

    @property
    def is_discrete(self) -> bool:
        """Whether the process is a discrete chain (has ``chain_times`` and ``network_index``)."""
        return self.chain_times is not None

    def network_index(self, t: ArrayLike) -> Array:
        """The 0-based chain index a discrete-time network is conditioned on at time t."""
        raise ValueError(
            f"{type(self).__name__} is a continuous process: it has no chain index (only DDPM and "
            "SMLD chains do)"
        )

    # ----------------------------------------------------------------------------- derived scales
    def alpha(self, t: ArrayLike) -> Array:
        """Signal scale alpha(t)."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> Array:
        """Noise scale sigma(t)."""
        return jnp.exp(self.log_sigma(t))

    def log_snr(self, t: ArrayLike) -> Array:
        """Half log signal-to-noise ratio lambda(t) = log(alpha/sigma) (Lu et al. 2022, Sec. 3.1).

        Strictly decreasing in t for every process here; SNR(t) = exp(2 lambda(t)).
        """
        return self.log_alpha(t) - self.log_sigma(t)

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        """Inverse of ``log_snr``: the time at which lambda(t) = log_snr.

        This generic version bisects on [t_min, T] (lambda is strictly decreasing) to float
        resolution; processes with a closed-form inverse override it.
        """
        log_snr = _as_float(log_snr)
        low = jnp.full_like(log_snr, self.t_min)
        high = jnp.full_like(log_snr, self.T)

        def bisect(_, bounds):
            low, high = bounds
            mid = 0.5 * (low + high)
            mid_is_early = self.log_snr(mid) > log_snr  # lambda decreases: the root lies later
            return jnp.where(mid_is_early, mid, low), jnp.where(mid_is_early, high, mid)

        low, high = jax.lax.fori_loop(0, 64, bisect, (low, high))
        return 0.5 * (low + high)

    # ----------------------------------------------------------------------------- the SDE
    def drift_coef(self, t: ArrayLike) -> Array:
        """f(t) = d log alpha / dt, the linear drift coefficient of the forward SDE."""
        return _time_derivative(self.log_alpha, t)

    def diffusion_sq(self, t: ArrayLike) -> Array:
        """g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2 (Kingma et al. 2021, App. A; Song et al. 2021).

        Computed as -2 sigma^2 d lambda/dt, which is the same identity (d log sigma^2/dt - 2 f =
        -2 d lambda/dt) without the cancellation between two large terms.
        """
        return -2.0 * jnp.exp(2.0 * self.log_sigma(t)) * _time_derivative(self.log_snr, t)

    def diffusion(self, t: ArrayLike) -> Array:
        """g(t), the diffusion coefficient of the forward SDE."""
        return jnp.sqrt(self.diffusion_sq(t))

    def sde(self, x: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Drift f(t) x and diffusion g(t) of dx = f(t) x dt + g(t) dW (Song et al. 2021, eq. 5)."""
        return expand_to(self.drift_coef(t), x) * x, self.diffusion(t)

    # ----------------------------------------------------------------------------- marginals
    def marginal(self, x0: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Mean alpha(t) x_0 and std sigma(t) of q(x_t | x_0); t is a scalar or a (batch,) array."""
        return expand_to(self.alpha(t), x0) * x0, self.sigma(t)

    def sample_marginal(self, key: Array, x0: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Draw x_t ~ q(x_t | x_0) for a batch; returns (x_t, eps) with x_t = alpha x_0 + sigma eps."""
        x0 = jnp.asarray(x0)
        eps = jax.random.normal(key, x0.shape, x0.dtype)
        mean, std = self.marginal(x0, t)
        return mean + expand_to(std, x0) * eps, eps

    # ----------------------------------------------------------------------------- the prior
    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, prior_std^2 I) from which sampling starts at t = T.

        Default: sqrt(alpha(T)^2 + sigma(T)^2), the std of x_T for data of zero mean and unit
        variance: exactly 1 for every variance-preserving process (Ho et al. 2020; Song et al. 2021).
        """
        with jax.ensure_compile_time_eval():  # a Python float even while being traced
            return float(np.hypot(self.alpha(self.T), self.sigma(self.T)))

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=None) -> Array:
        """Draw x_T ~ N(0, prior_std^2 I)."""
        dtype = dtype or jnp.result_type(float)
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x: ArrayLike) -> Array:
        """log N(x; 0, prior_std^2 I), summed over all but the batch axis."""
        x = jnp.asarray(x)
        dim = np.prod(x.shape[1:])
        return -0.5 * sum_except_batch((x / self.prior_std) ** 2) - dim * (
            math.log(self.prior_std) + 0.5 * math.log(2 * math.pi)
        )

    # ----------------------------------------------------------------------------- two-time kernels
    def transition(self, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Scale and std of q(x_t | x_s) = N(scale x_s, std^2 I) for s < t.

        scale = alpha_t / alpha_s and std^2 = sigma_t^2 - scale^2 sigma_s^2 = sigma_t^2 (1 - SNR_t/SNR_s)
        (Kingma et al. 2021, eq. 2-3). For DDPM's consecutive steps this is (sqrt(1 - beta_i),
        sqrt(beta_i)) (Ho et al. 2020, eq. 2).
        """
        scale = jnp.exp(self.log_alpha(t) - self.log_alpha(s))
        variance = jnp.exp(2.0 * self.log_sigma(t)) * -jnp.expm1(
            2.0 * (self.log_snr(t) - self.log_snr(s))
        )
        return scale, jnp.sqrt(variance)

    def posterior(self, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array, Array]:
        """q(x_s | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, std^2 I) for s < t.

        With r = SNR_t / SNR_s: coef_x0 = alpha_s (1 - r), coef_xt = r alpha_s / alpha_t and
        std^2 = sigma_s^2 (1 - r) (Kingma et al. 2021, eq. 4; for DDPM's consecutive steps these are
        Ho et al. 2020, eq. 7, with std^2 = beta-tilde).
        """
        log_snr_ratio = 2.0 * (self.log_snr(t) - self.log_snr(s))
        one_minus_ratio = -jnp.expm1(log_snr_ratio)
        log_alpha_s = self.log_alpha(s)
        coef_x0 = jnp.exp(log_alpha_s) * one_minus_ratio
        coef_xt = jnp.exp(log_snr_ratio + log_alpha_s - self.log_alpha(t))
        std = jnp.exp(self.log_sigma(s)) * jnp.sqrt(one_minus_ratio)
        return coef_x0, coef_xt, std

    def ancestral_std(self, s: ArrayLike, t: ArrayLike, variance: str = "beta_tilde") -> Array:
        """Std of the reverse step x_t -> x_s in ancestral sampling (Ho et al. 2020, Sec. 3.2).

        ``variance='beta_tilde'`` is the posterior std (sigma_t^2 = beta-tilde_t, exact for a point
        mass x_0); ``variance='beta'`` is the forward transition std (sigma_t^2 = beta_t, exact for
        x_0 ~ N(0, I)).
        """
        if variance == "beta_tilde":
            return self.posterior(s, t)[2]
        if variance == "beta":
            return self.transition(s, t)[1]
        raise ValueError(f"variance={variance!r} is not one of 'beta_tilde', 'beta'")

    # ----------------------------------------------------------------------------- validation
    def check_times(self, *times: float) -> None:
        """Raise ValueError unless every given time lies in [t_min, T] (before anything compiles)."""
        for t in times:
            _require(
                self.t_min - 1e-12 <= float(t) <= self.T + 1e-12,
                f"time {float(t)!r} is outside the process's interval "
                f"[t_min, T] = [{self.t_min!r}, {self.T!r}] ({type(self).__name__})",
            )


# ================================================================================ VP family
@dataclasses.dataclass(frozen=True, kw_only=True)
class VPSDE(Process):
    """Variance-preserving SDE with linear beta(t) = beta_min + t (beta_max - beta_min).

    alpha(t) = exp(-1/2 int_0^t beta), sigma = sqrt(1 - alpha^2); f = -beta/2, g^2 = beta
    (Song et al. 2021, eqs. 11 and 33; the N -> infinity limit of DDPM with beta_i = beta(t_i)/N).
    """

    name: ClassVar[str] = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-5
    T: float = 1.0

    def __post_init__(self):
        _require(
            0.0 < self.beta_min < self.beta_max,
            f"{type(self).__name__}: need 0 < beta_min < beta_max, "
            f"got beta_min={self.beta_min!r}, beta_max={self.beta_max!r}",
        )
        _check_time_interval(type(self).__name__, self.t_min, self.T)

    @property
    def sampling_t_end(self) -> float:
        return 1e-3

    def log_alpha(self, t: ArrayLike) -> Array:
        # -1/2 int_0^t beta(s) ds (Song et al. 2021, eq. 33).
        t = _as_float(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t: ArrayLike) -> Array:
        return _log_sigma_vp(self.log_alpha(t))

    def _t_from_log_alpha(self, log_alpha: Array) -> Array:
        # Positive root of (beta_max - beta_min)/4 t^2 + beta_min/2 t + log_alpha = 0, written as
        # -2 log_alpha / (b + sqrt(b^2 - 4 a log_alpha)) to avoid cancellation (Lu et al. 2022, App. D).
        half_beta_min = 0.5 * self.beta_min
        discriminant = half_beta_min**2 - (self.beta_max - self.beta_min) * log_alpha
        return -2.0 * log_alpha / (half_beta_min + jnp.sqrt(discriminant))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        return self._t_from_log_alpha(_log_alpha_from_vp_log_snr(log_snr))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubVPSDE(VPSDE):
    """Sub-VP SDE: the VP SDE's alpha with sigma = 1 - alpha^2 (Song et al. 2021, eq. 34).

    g^2 = beta(t) (1 - exp(-2 int_0^t beta)); its variance is below the VP one at every t.
    """

    name: ClassVar[str] = "subvp"

    def log_sigma(self, t: ArrayLike) -> Array:
        return jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        # e^lambda (1 - alpha^2) = alpha  =>  alpha = 2 e^lambda / (1 + sqrt(1 + 4 e^{2 lambda})).
        log_snr = _as_float(log_snr)
        sqrt_term = jnp.exp(0.5 * jnp.logaddexp(0.0, 2.0 * log_snr + math.log(4.0)))
        log_alpha = log_snr + math.log(2.0) - jnp.log1p(sqrt_term)
        return self._t_from_log_alpha(log_alpha)

    @property
    def prior_std(self) -> float:
        """The prior is N(0, I) (Song et al. 2021, Sec. 3.4 and score_sde)."""
        return 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class CosineVP(Process):
    """Continuous-time cosine schedule (Nichol & Dhariwal 2021, eq. 17; s = 0.008).

    alpha(t) = cos(theta(t)) / cos(theta(0)) with theta(t) = (t + s)/(1 + s) * pi/2, sigma^2 = 1 - alpha^2.
    alpha(1) = 0 and g^2 diverges there, so T must be below 1; DPM-Solver uses T = 0.9946
    (Lu et al. 2022, App. D).
    """

    name: ClassVar[str] = "cosine"
    s: float = 0.008
    t_min: float = 1e-5
    T: float = 0.9946

    def __post_init__(self):
        _require(self.s > 0.0, f"CosineVP: need s > 0, got s={self.s!r}")
        _check_time_interval("CosineVP", self.t_min, self.T)
        _require(self.T < 1.0, f"CosineVP: need T < 1 (alpha(1) = 0), got T={self.T!r}")

    @property
    def sampling_t_end(self) -> float:
        return 1e-3

    def _theta(self, t: ArrayLike) -> Array:
        return (_as_float(t) + self.s) / (1.0 + self.s) * (0.5 * math.pi)

    @property
    def _theta0(self) -> float:
        return self.s / (1.0 + self.s) * (0.5 * math.pi)

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.log(jnp.cos(self._theta(t))) - math.log(math.cos(self._theta0))

    def log_sigma(self, t: ArrayLike) -> Array:
        # 1 - cos^2(theta)/cos^2(theta0) = sin(theta - theta0) sin(theta + theta0) / cos^2(theta0),
        # exact as t -> 0 where 1 - alpha^2 would cancel.
        theta, theta0 = self._theta(t), self._theta0
        return 0.5 * (
            jnp.log(jnp.sin(theta - theta0)) + jnp.log(jnp.sin(theta + theta0))
        ) - math.log(math.cos(theta0))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        log_alpha = _log_alpha_from_vp_log_snr(log_snr)
        theta = jnp.arccos(jnp.exp(log_alpha + math.log(math.cos(self._theta0))))
        return theta * (2.0 * (1.0 + self.s) / math.pi) - self.s


# ================================================================================ VE family
@dataclasses.dataclass(frozen=True, kw_only=True)
class VESDE(Process):
    """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    g^2 = d sigma^2/dt = 2 ln(sigma_max/sigma_min) sigma(t)^2 (Song et al. 2021, eq. 30).
    Marginal convention (as score_sde): q(x_t | x_0) = N(x_0, sigma(t)^2 I) with sigma(0) = sigma_min,
    i.e. the t = 0 marginal already carries sigma_min of noise; the SDE started from a point mass at
    t = 0 has variance sigma(t)^2 - sigma_min^2 instead.
    """

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    T: float = 1.0

    def __post_init__(self):
        _require(
            0.0 < self.sigma_min < self.sigma_max,
            f"{type(self).__name__}: need 0 < sigma_min < sigma_max, "
            f"got sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}",
        )
        _check_time_interval(type(self).__name__, self.t_min, self.T)

    @property
    def sampling_t_end(self) -> float:
        return 1e-5

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(_as_float(t))

    def log_sigma(self, t: ArrayLike) -> Array:
        return math.log(self.sigma_min) + _as_float(t) * self._log_ratio

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        return (-_as_float(log_snr) - math.log(self.sigma_min)) / self._log_ratio

    @property
    def prior_std(self) -> float:
        """sigma(T): the data's contribution to x_T is neglected (Song & Ermon 2019; Song et al. 2021)."""
        with jax.ensure_compile_time_eval():
            return float(self.sigma(self.T))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SMLD(VESDE):
    """SMLD / NCSN noise levels (Song & Ermon 2019): sigma_1 > ... > sigma_L, geometric.

    NCSN's levels are ``sigmas = exp(linspace(log sigma_max, log sigma_min, L))`` (default 10 levels
    1 -> 0.01; NCSNv2 uses larger sets, e.g. 232 levels 50 -> 0.01 for CIFAR-10). The chain's states sit
    at ``chain_times`` = linspace(0, 1, L) in increasing noise, where the VE SDE with the same endpoints
    has exactly these sigmas: the continuous view of SMLD *is* that VE SDE (Song et al. 2021, Sec. 3.4).
    The one-step perturbation kernel of a level is q(x | x_0) = N(x_0, sigma_i^2 I); the Markov chain of
    Song et al. 2021 (eq. 8) is ``transition`` between consecutive chain times.
    """

    name: ClassVar[str] = "smld"
    num_levels: int = 10
    sigma_min: float = 0.01
    sigma_max: float = 1.0
    t_min: float = 0.0
    T: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _require(
            isinstance(self.num_levels, int) and self.num_levels >= 2,
            f"SMLD: need an integer num_levels >= 2, got num_levels={self.num_levels!r}",
        )
        _require(
            (self.t_min, self.T) == (0.0, 1.0),
            f"SMLD: the levels span t in [0, 1]; got t_min={self.t_min!r}, T={self.T!r}",
        )

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """NCSN's noise levels sigma_1 > ... > sigma_L (float64)."""
        return np.exp(
            np.linspace(math.log(self.sigma_max), math.log(self.sigma_min), self.num_levels)
        )

    @functools.cached_property
    def chain_times(self) -> np.ndarray:
        """Times of sigma_L, ..., sigma_1 (increasing noise)."""
        return np.linspace(0.0, 1.0, self.num_levels)

    def network_index(self, t: ArrayLike) -> Array:
        """NCSN's 0-based level index at time t: 0 for sigma_1 (largest), L - 1 for sigma_L."""
        return (self.num_levels - 1) * (1.0 - _as_float(t))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EDM(Process):
    """Karras et al. 2022 ("EDM"): alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max].

    Their preconditioning (with the data std sigma_data) is a parameterization
    (``diffusion.parameterization``) and their rho-grid a time grid (``diffusion.samplers.grids``):
    both apply to every process, so neither is a field here.
    """

    name: ClassVar[str] = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    t_min: float = dataclasses.field(init=False)
    T: float = dataclasses.field(init=False)

    def __post_init__(self):
        _require(
            0.0 < self.sigma_min < self.sigma_max,
            f"EDM: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min!r}, "
            f"sigma_max={self.sigma_max!r}",
        )
        object.__setattr__(self, "t_min", float(self.sigma_min))
        object.__setattr__(self, "T", float(self.sigma_max))

    @property
    def sampling_t_end(self) -> float:
        return self.sigma_min

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(_as_float(t))

    def log_sigma(self, t: ArrayLike) -> Array:
        return jnp.log(_as_float(t))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        return jnp.exp(-_as_float(log_snr))

    @property
    def prior_std(self) -> float:
        """sigma_max (Karras et al. 2022, Alg. 1 line 1)."""
        return float(self.sigma_max)


# ================================================================================ flow matching
@dataclasses.dataclass(frozen=True, kw_only=True)
class RectifiedFlow(Process):
    """Rectified flow / flow matching: the straight path x_t = (1 - s) x_0 + s eps.

    alpha = 1 - s(t), sigma = s(t) (Liu et al. 2022, eq. 1; Lipman et al. 2022, the optimal-transport
    path of eq. 20 with sigma_min = 0). ``shift`` is the resolution-dependent timestep shift of Esser
    et al. 2024 (Sec. 5.3): s(t) = shift t / (1 + (shift - 1) t), which spends more of [0, 1] at high
    noise; shift = 1 is the plain path s = t. Its log-SNR is lambda = log((1 - s) / s), inverted in
    closed form (s = sigmoid(-lambda)). alpha(1) = 0, where lambda = -inf, so T stops just short of 1:
    the prior N(0, prior_std^2 I) at T = 1 - 1e-3 has prior_std = 0.999 for unit-variance data.
    """

    name: ClassVar[str] = "flow"
    shift: float = 1.0
    t_min: float = 1e-5
    T: float = 1.0 - 1e-3

    def __post_init__(self):
        _require(
            math.isfinite(self.shift) and self.shift > 0.0,
            f"RectifiedFlow: need shift > 0, got shift={self.shift!r}",
        )
        _check_time_interval("RectifiedFlow", self.t_min, self.T)
        _require(self.T < 1.0, f"RectifiedFlow: need T < 1 (alpha(1) = 0), got T={self.T!r}")

    @property
    def sampling_t_end(self) -> float:
        return 1e-3

    def _noise_fraction(self, t: ArrayLike) -> Array:
        """s(t) = shift t / (1 + (shift - 1) t) (Esser et al. 2024, Sec. 5.3)."""
        t = _as_float(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.log1p(-self._noise_fraction(t))

    def log_sigma(self, t: ArrayLike) -> Array:
        return jnp.log(self._noise_fraction(t))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        # (1 - s) / s = e^lambda  =>  s = sigmoid(-lambda); then invert the shift.
        fraction = jax.nn.sigmoid(-_as_float(log_snr))
        return fraction / (self.shift - (self.shift - 1.0) * fraction)


# ================================================================================ discrete DDPM
DDPM_SCHEDULES = ("linear", "cosine", "quadratic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPM(Process):
    """The discrete DDPM chain (Ho et al. 2020) of ``num_steps`` = N steps, and its continuous view.

    Step i = 1..N adds noise with beta_i: q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I) and
    alpha_bar_i = prod_{j<=i} (1 - beta_j). Step i sits at time t_i = i / N, and alpha(t) interpolates
    log alpha piecewise-linearly through (t_i, 1/2 log alpha_bar_i) with alpha_bar_0 = 1 (the continuous
    view of discrete schedules used by DPM-Solver, Lu et al. 2022, App. D). At the chain times every
    derived quantity is the textbook one: ``transition(t_{i-1}, t_i)`` is (sqrt(1 - beta_i), sqrt(beta_i))
    and ``posterior(t_{i-1}, t_i)`` is Ho et al.'s eq. 7 with variance beta-tilde_i.

    Schedules: 'linear' (beta_start -> beta_end, Ho et al.: 1e-4 -> 0.02 for N = 1000; Higham, Higham &
    Grindrod 2023 use the same endpoints with N = 500), 'quadratic' (linear in sqrt(beta), the DDPM
    codebase's 'quad'), 'cosine' (Nichol & Dhariwal 2021, eq. 17, betas clipped at ``max_beta``).
    """

    name: ClassVar[str] = "ddpm"
    num_steps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    max_beta: float = 0.999
    t_min: float = dataclasses.field(init=False)
    T: float = dataclasses.field(init=False)

    def __post_init__(self):
        _require(
            isinstance(self.num_steps, int) and self.num_steps >= 1,
            f"DDPM: need an integer num_steps >= 1, got num_steps={self.num_steps!r}",
        )
        _require(
            self.schedule in DDPM_SCHEDULES,
            f"DDPM: unknown schedule {self.schedule!r}; accepted: {', '.join(DDPM_SCHEDULES)}",
        )
        if self.schedule == "cosine":
            _require(self.cosine_s > 0.0, f"DDPM: need cosine_s > 0, got {self.cosine_s!r}")
            _require(
                0.0 < self.max_beta < 1.0, f"DDPM: need 0 < max_beta < 1, got {self.max_beta!r}"
            )
        else:
            _require(
                0.0 < self.beta_start <= self.beta_end < 1.0,
                f"DDPM: need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start!r}, "
                f"beta_end={self.beta_end!r}",
            )
        object.__setattr__(self, "t_min", 1.0 / self.num_steps)
        object.__setattr__(self, "T", 1.0)

    @property
    def sampling_t_end(self) -> float:
        return self.t_min

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """beta_1 .. beta_N (float64)."""
        n = self.num_steps
        if self.schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n)
        if self.schedule == "quadratic":
            return np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), n) ** 2
        # Cosine: alpha_bar(i) = f(i)/f(0), f(i) = cos^2((i/N + s)/(1 + s) pi/2) (Nichol & Dhariwal eq. 17).
        angles = (np.arange(n + 1) / n + self.cosine_s) / (1 + self.cosine_s) * (0.5 * np.pi)
        alpha_bar = np.cos(angles) ** 2 / np.cos(angles[0]) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], self.max_beta)

    @functools.cached_property
    def alphas_bar(self) -> np.ndarray:
        """alpha_bar_1 .. alpha_bar_N = cumulative products of (1 - beta_i) (float64)."""
        return np.cumprod(1.0 - self.betas)

    @functools.cached_property
    def chain_times(self) -> np.ndarray:
        """t_i = i / N for the chain states x_1 .. x_N."""
        return np.arange(1, self.num_steps + 1) / self.num_steps

    @functools.cached_property
    def _knot_times(self) -> np.ndarray:
        return np.arange(self.num_steps + 1) / self.num_steps

    @functools.cached_property
    def _knot_log_alphas(self) -> np.ndarray:
        return 0.5 * np.concatenate([[0.0], np.cumsum(np.log1p(-self.betas))])

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.interp(_as_float(t), self._knot_times, self._knot_log_alphas)

    def log_sigma(self, t: ArrayLike) -> Array:
        return _log_sigma_vp(self.log_alpha(t))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        # log alpha is piecewise linear and decreasing in t: invert it by interpolation.
        log_alpha = _log_alpha_from_vp_log_snr(log_snr)
        return jnp.interp(log_alpha, self._knot_log_alphas[::-1], self._knot_times[::-1])

    def network_index(self, t: ArrayLike) -> Array:
        """The 0-based step index a DDPM network is conditioned on: i - 1 at t_i = i / N (Ho et al.)."""
        return _as_float(t) * self.num_steps - 1.0


# ================================================================================ registry
PROCESSES: dict[str, type[Process]] = {
    cls.name: cls for cls in (VPSDE, SubVPSDE, VESDE, CosineVP, DDPM, SMLD, EDM, RectifiedFlow)
}


def make_process(name: str, **kwargs) -> Process:
    """Build a process by its registry name (``PROCESSES``: 'vp', 'subvp', 've', 'cosine', 'ddpm',
    'smld', 'edm', 'flow')."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; accepted: {', '.join(PROCESSES)}")
    cls = PROCESSES[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"process {name!r} has no argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(**kwargs)
