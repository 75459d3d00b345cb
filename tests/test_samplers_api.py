"""The sampler API: every registered sampler on every process and parameterization compiles once and
reports its NFE; bad input fails before anything compiles; the NFE planner; the sweep."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import (
    PARAMETERIZATIONS,
    Denoiser,
    edm_preconditioning,
    prediction_from_eps_x0,
)
from diffusion.samplers import SAMPLERS, get_sampler, sample, sweep
from diffusion.shapes import expand_to

PROCESS_NAMES = list(P.PROCESSES)  # every registered process
NUM_STEPS = 6  # divisible by 2 and 3, so multistep / higher-order solvers fit too
# Options that keep the smoke test short (NCSN's default is 100 Langevin steps per level).
SMOKE_OPTIONS = {"annealed_langevin": {"n_steps_each": 2}}
PARAMS = {"variance": jnp.float32(0.5)}
SIGMA_DATA = 0.5


class TinyNet:
    """The exact network of Gaussian data N(0, variance I) in any parameterization: a few flops,
    linear in x, benign on every process. It counts its traces and, optionally, its calls."""

    def __init__(self, process, parameterization, count_calls: bool = False):
        self.process = process
        self.parameterization = parameterization
        self.traces = 0
        self.calls = 0
        self.count_calls = count_calls

    def _count_call(self):
        self.calls += 1

    def __call__(self, params, x_in, t_in):
        self.traces += 1  # a Python side effect: runs once per trace, never in compiled code
        if self.count_calls:
            jax.debug.callback(self._count_call)  # runs at every execution of the network
        variance = params["variance"]
        if self.parameterization == "edm":  # x_in = c_in x_hat, t_in = ln(sigma_hat) / 4
            sigma_hat = expand_to(jnp.exp(4.0 * t_in), x_in)
            c_skip, c_out, c_in, _ = edm_preconditioning(sigma_hat, SIGMA_DATA)
            x_hat = x_in / c_in
            x0 = variance * x_hat / (variance + sigma_hat**2)
            return (x0 - c_skip * x_hat) / c_out
        alpha = expand_to(self.process.alpha(t_in), x_in)
        sigma = expand_to(self.process.sigma(t_in), x_in)
        x0 = alpha * variance * x_in / (alpha**2 * variance + sigma**2)
        eps = (x_in - alpha * x0) / sigma
        return prediction_from_eps_x0(eps, x0, self.parameterization, alpha, sigma)


def tiny_denoiser(process, parameterization="eps", count_calls=False):
    net = TinyNet(process, parameterization, count_calls)
    time_input = "quarter_log_sigma" if parameterization == "edm" else "t"  # EDM's c_noise
    return net, Denoiser(
        PARAMS, net, process, parameterization, time_input=time_input, sigma_data=SIGMA_DATA
    )


def grid_for(process):
    return "linspace" if process.is_discrete else "uniform_t"


def latin_cases():
    """Every (sampler, process) pair; the parameterization cycles so that every sampler and every
    process meets every parameterization. One pair per sampler (the processes in turn) is in the
    fast tier, the rest are marked slow."""
    cases = []
    for (i, name), (j, process_name) in itertools.product(
        enumerate(sorted(SAMPLERS)), enumerate(PROCESS_NAMES)
    ):
        parameterization = list(PARAMETERIZATIONS)[(i + j) % len(PARAMETERIZATIONS)]
        marks = () if j == i % len(PROCESS_NAMES) else (pytest.mark.slow,)
        cases.append(
            pytest.param(name, process_name, parameterization, (i + j) % 2 == 1, marks=marks)
        )
    return cases


@pytest.mark.parametrize(("name", "process_name", "parameterization", "images"), latin_cases())
def test_every_sampler_runs_compiles_once_and_reports_its_nfe(
    name, process_name, parameterization, images
):
    spec = get_sampler(name)
    options = SMOKE_OPTIONS.get(name, {})
    is_adaptive = spec.nfe(NUM_STEPS, **spec.check_options(options)) is None
    process = P.make_process(process_name)
    net, denoiser = tiny_denoiser(process, parameterization, count_calls=is_adaptive)
    shape = (2, 3, 2, 1) if images else (3, 2)
    x_init = process.prior_sample(jax.random.PRNGKey(0), shape)

    def run(key, x, record=False):
        return sample(
            name,
            denoiser,
            key,
            x,
            grid=grid_for(process),
            num_steps=NUM_STEPS,
            record=record,
            **options,
        )

    first = jax.block_until_ready(run(jax.random.PRNGKey(1), x_init))
    jax.effects_barrier()
    traces, calls = net.traces, net.calls
    assert traces > 0
    second = run(jax.random.PRNGKey(2), process.prior_sample(jax.random.PRNGKey(3), shape))
    same_start = run(jax.random.PRNGKey(4), x_init)
    assert net.traces == traces, "a second call with a new key and x_init retraced"

    for result in (first, second, same_start):
        assert result.samples.shape == shape
        assert result.samples.dtype == x_init.dtype
        assert bool(jnp.all(jnp.isfinite(result.samples)))
    if is_adaptive:
        assert int(first.nfe) == calls  # counted network executions of the first call
    else:
        assert (
            int(first.nfe) == int(second.nfe) == spec.nfe(NUM_STEPS, **spec.check_options(options))
        )
    if spec.is_deterministic(**options):
        np.testing.assert_array_equal(same_start.samples, first.samples)
    else:
        assert not np.array_equal(np.asarray(same_start.samples), np.asarray(first.samples))
    assert first.trajectory is None and first.denoised is None  # only when asked for
    # The recorded run is the same run (compiled apart, so equal to float32 rounding), with its
    # states from x_init to the samples.
    recorded = run(jax.random.PRNGKey(1), x_init, record=True)
    np.testing.assert_allclose(recorded.samples, first.samples, rtol=1e-4, atol=1e-5)
    if is_adaptive:
        assert recorded.trajectory is None
    else:
        levels = 1 if name == "annealed_langevin" else 0  # it also samples at the grid's first time
        assert recorded.trajectory.shape == (NUM_STEPS + 1 + levels, *shape)
        assert recorded.denoised.shape == (NUM_STEPS + levels, *shape)
        np.testing.assert_array_equal(recorded.trajectory[0], x_init)
        np.testing.assert_array_equal(recorded.trajectory[-1], recorded.samples)
        assert bool(jnp.all(jnp.isfinite(recorded.denoised)))


# ================================================================================ bad input
def vp_denoiser():
    return tiny_denoiser(P.VPSDE())


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dpm_solver_17", {}, "unknown sampler 'dpm_solver_17'"),
        ("ddim", {"etta": 0.5}, "has no option"),
        ("ddim", {"eta": 2.0}, r"eta=2.0 must lie in \[0.0, 1.0\]"),
        ("ddim", {"eta": "one"}, "must be a finite number"),
        ("ancestral", {"variance": "fixedlarge"}, "variance='fixedlarge' is not one of"),
        ("pc", {"predictor": "midpoint"}, "predictor='midpoint' is not one of"),
        ("pc", {"corrector": "hmc"}, "corrector='hmc' is not one of"),
        ("pc", {"predictor": "none", "corrector": "none"}, "would not sample anything"),
        ("pc", {"snr": -0.1}, "snr"),
        ("pc", {"n_corrector_steps": 0}, "n_corrector_steps=0 must be an integer >= 1"),
        ("annealed_langevin", {"n_steps_each": 2.5}, "n_steps_each"),
        ("annealed_langevin", {"step_lr": 0.0}, "step_lr"),
        ("edm_stochastic", {"S_churn": -1.0}, "S_churn"),
        ("edm_stochastic", {"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmax"),
        ("adaptive", {"solver": "rk4"}, "solver='rk4' is not one of"),
        ("adaptive", {"rtol": 0.0}, "rtol"),
        ("adaptive", {"max_steps": 0}, "max_steps"),
        ("adaptive", {"time_variable": "sigma"}, "time_variable='sigma' is not one of"),
        ("euler", {"t_end": 0.0}, "outside the process's interval"),
        ("euler", {"t_start": 1.5}, "outside the process's interval"),
        ("euler", {"grid": "trailing"}, "needs a discrete chain"),
        ("euler", {"grid": "cosine"}, "unknown time grid"),
        ("euler", {"num_steps": 0}, "num_steps must be an integer >= 1"),
        ("euler", {"denoise_final": "yes"}, "denoise_final must be True or False"),
        ("euler", {"denoise_final": True, "denoise_order": 0}, "denoise_order=0"),
        ("ancestral", {"denoise_final": True, "denoise_order": 2}, "stochastic"),
        ("adaptive", {"denoise_final": True, "denoise_order": 2}, "adaptive"),
        ("adaptive", {"max_nfe": 5}, "max_nfe=5 must be an integer >= 7"),
        ("euler", {"num_steps": None}, "exactly one of num_steps and nfe"),
        ("euler", {"nfe": 4}, "exactly one of num_steps and nfe"),
        ("heun", {"num_steps": None, "nfe": 7}, "cannot spend exactly nfe=7"),
    ],
)
def test_bad_input_raises_before_anything_compiles(name, kwargs, message):
    net, denoiser = vp_denoiser()
    kwargs = {"num_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(name, denoiser, jax.random.PRNGKey(0), (2, 2), **kwargs)
    assert net.traces == 0


def test_bad_initial_state_raises_before_anything_compiles():
    net, denoiser = vp_denoiser()
    for bad in [(2, 0), (), jnp.zeros((2, 2), jnp.int32), jnp.float32(1.0)]:
        with pytest.raises(ValueError, match=r"shape|x_init"):
            sample("euler", denoiser, jax.random.PRNGKey(0), bad, num_steps=2)
    assert net.traces == 0


@pytest.mark.slow
@pytest.mark.parametrize("denoise_final", [False, True])
def test_sample_with_an_nfe_budget_spends_it_exactly(denoise_final):
    """sample(nfe=N) plans the steps (and DPM-Solver-fast's orders) that spend exactly N network
    evaluations, the final step to sigma = 0 included (of order 2 for deterministic samplers: it
    reuses their recorded predictions, DPM-Solver-fast's planned orders too), for every fixed-NFE
    sampler that can."""
    _, denoiser = vp_denoiser()
    for name in sorted(SAMPLERS):
        spec = get_sampler(name)
        options = SMOKE_OPTIONS.get(name, {})
        if spec.is_adaptive(**options):
            continue
        final_order = 2 if denoise_final and spec.is_deterministic(**options) else 1
        for nfe in (6, 7, 12):
            try:
                get_sampler(name).steps_for_nfe(nfe - denoise_final, **options)
            except ValueError:  # e.g. Heun at an odd budget: said before anything runs
                continue
            result = sample(
                name,
                denoiser,
                jax.random.PRNGKey(0),
                (2, 2),
                nfe=nfe,
                denoise_final=denoise_final,
                denoise_order=final_order,
                **options,
            )
            assert int(result.nfe) == nfe, (name, nfe)


@pytest.mark.slow
def test_adaptive_max_nfe_caps_the_evaluations():
    """With max_nfe the solve stops (an error at run time) instead of spending more; a budget it
    meets gives the same answer as no budget."""
    _, denoiser = vp_denoiser()
    free = sample("adaptive", denoiser, jax.random.PRNGKey(0), (2, 2), num_steps=1, rtol=1e-3)
    within = sample(
        "adaptive",
        denoiser,
        jax.random.PRNGKey(0),
        (2, 2),
        num_steps=1,
        rtol=1e-3,
        max_nfe=int(free.nfe),
    )
    np.testing.assert_array_equal(within.samples, free.samples)
    with pytest.raises(Exception, match=r"max_steps|maximum number of"):
        jax.block_until_ready(
            sample(
                "adaptive",
                denoiser,
                jax.random.PRNGKey(0),
                (2, 2),
                num_steps=1,
                rtol=1e-3,
                max_nfe=int(free.nfe) - 6,
            ).samples
        )


def test_steps_for_nfe_hits_every_budget_exactly_or_says_why():
    assert get_sampler("heun").steps_for_nfe(10)[0] == 5
    assert get_sampler("euler").steps_for_nfe(7)[0] == 7
    num_steps, options = get_sampler("pc").steps_for_nfe(12, n_corrector_steps=2)
    assert num_steps == 4 and options["corrector"] == "langevin"
    num_steps, _ = get_sampler("annealed_langevin").steps_for_nfe(30, n_steps_each=5)
    assert num_steps == 5  # (5 + 1) levels x 5 steps
    with pytest.raises(ValueError, match="cannot spend exactly nfe=7"):
        get_sampler("heun").steps_for_nfe(7)
    with pytest.raises(ValueError, match="cannot spend exactly"):
        get_sampler("adaptive").steps_for_nfe(50)
    with pytest.raises(ValueError, match="has no option"):
        get_sampler("euler").steps_for_nfe(5, eta=0.0)


# ================================================================================ sweep
def test_sweep_hits_each_nfe_and_records_errors_against_the_reference():
    process = P.VPSDE()
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (32, 2))
    reference = oracle.ode_flow(process, x_init, process.T, process.sampling_t_end)
    metric_calls = []

    def mean_norm(samples):
        metric_calls.append(samples.shape)
        return float(np.mean(np.linalg.norm(samples, axis=1)))

    records = sweep(
        denoiser,
        jax.random.PRNGKey(1),
        x_init,
        reference,
        solvers=[("euler", {}), ("heun", {}), ("ddim", {"eta": 0.0}), ("adaptive", {"rtol": 1e-5})],
        nfes=[8, 9, 32],
        grids=["uniform_t", "linspace"],
        metric=mean_norm,
        repeats=1,
    )
    by_key = {(r["solver"], r["grid"], r["nfe_target"]): r for r in records}
    assert len(records) == 3 * 3 * 2 + 2  # fixed-step solvers x NFEs x grids + adaptive x grids
    for record in records:
        if record["grid"] == "linspace":  # an index grid on a continuous process
            assert record["skipped"] is not None
    assert "needs a discrete chain" in by_key[("euler", "linspace", 8)]["skipped"]
    assert "cannot spend exactly nfe=9" in by_key[("heun", "uniform_t", 9)]["skipped"]
    ran = [r for r in records if r["skipped"] is None]
    assert len(ran) == 3 * 3 - 1 + 1
    for record in ran:
        if record["nfe_target"] is not None:
            assert record["nfe"] == record["nfe_target"]
        assert record["seconds"] > 0 and record["deterministic"]
    assert len(metric_calls) == len(ran)
    for solver in ["euler", "heun", "ddim"]:
        coarse, fine = by_key[(solver, "uniform_t", 8)], by_key[(solver, "uniform_t", 32)]
        assert fine["error_rmse"] < coarse["error_rmse"]
    assert by_key[("heun", "uniform_t", 8)]["num_steps"] == 4
    assert by_key[("adaptive", "uniform_t", None)]["error_rmse"] < 1e-3


def test_sweep_skips_index_grids_that_do_not_span_the_reference_interval():
    """'trailing' with 10 of DDPM's 1000 steps ends at t = 0.1, 'linspace' spans [1/N, 1]."""
    process = P.DDPM(num_steps=1000)
    denoiser = O.preset("gaussian_2d").denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (8, 2))
    records = sweep(
        denoiser,
        jax.random.PRNGKey(1),
        x_init,
        x_init,
        solvers=[("ddim", {})],
        nfes=[10],
        grids=["linspace", "trailing"],
        repeats=1,
    )
    by_grid = {r["grid"]: r for r in records}
    assert by_grid["linspace"]["skipped"] is None
    assert "not comparable" in by_grid["trailing"]["skipped"]


def test_sweep_counts_the_final_denoising_step_and_validates_first():
    net, denoiser = vp_denoiser()
    x_init = jnp.zeros((4, 2))
    records = sweep(
        denoiser,
        jax.random.PRNGKey(0),
        x_init,
        x_init,
        solvers=[("euler", {})],
        nfes=[5],
        denoise_final=True,
        repeats=1,
    )
    assert records[0]["num_steps"] == 4 and records[0]["nfe"] == 5
    net, denoiser = vp_denoiser()
    bad_calls = [
        {"solvers": [("euler", {"eta": 1.0})], "nfes": [5]},
        {"solvers": [("euler", {})], "nfes": [0]},
        {"solvers": [("euler", {})], "nfes": [5], "grids": ["cosine"]},
    ]
    for kwargs in bad_calls:
        with pytest.raises(ValueError):
            sweep(denoiser, jax.random.PRNGKey(0), x_init, x_init, repeats=1, **kwargs)
    with pytest.raises(ValueError, match="reference has shape"):
        sweep(
            denoiser,
            jax.random.PRNGKey(0),
            x_init,
            x_init[:2],
            solvers=[("euler", {})],
            nfes=[5],
        )
    assert net.traces == 0
