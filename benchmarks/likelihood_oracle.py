"""Probability-flow log-likelihood against the exact log-density of the oracle presets.

For every preset (ring8_2d, gaussian_2d, gmm_64d) and process, points x ~ p_{t_min} (the density
being checked) are drawn, and ``diffusion.likelihood`` integrates
the probability-flow ODE with the oracle's exact denoiser (Dopri5, exact divergence, float64) from
t_min to T and adds log p_T(x_T). The error per dimension against the oracle's exact log p_{t_min}(x)
is then the ODE solver's alone when log p_T is the exact noised density (column ``exact_prior``);
with the process's standard prior N(0, sigma(T)^2 I) it also contains the prior mismatch (column
``standard_prior``), which is what a trained model pays. The DDPM chain is solved in the log-SNR
variable (its piecewise-linear log alpha(t) has a kink at every step time).

    python -m benchmarks.likelihood_oracle [--quick]

prints one JSON object: {"records": [{preset, process, time_variable, rtol, num_points,
max_abs_error_per_dim_exact_prior, max_abs_error_per_dim_standard_prior, nfe}, ...]}.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402  (after enabling float64)

from diffusion import likelihood, oracle, processes  # noqa: E402

PROCESSES = {
    "vp": processes.VPSDE,
    "subvp": processes.SubVPSDE,
    "ve": processes.VESDE,
    "cosine": processes.CosineVP,
    "ddpm": lambda: processes.DDPM(num_steps=1000, beta_start=1e-4, beta_end=0.02),
    "edm": processes.EDM,
}
PRESETS = ("ring8_2d", "gaussian_2d", "gmm_64d")


def run(quick: bool) -> dict:
    rtols = (1e-5,) if quick else (1e-5, 1e-6)
    num_points = 16 if quick else 128
    presets = PRESETS[:1] if quick else PRESETS
    records = []
    for preset_name in presets:
        truth = oracle.preset(preset_name)
        for process_name, make in PROCESSES.items():
            process = make()
            x = truth.sample_marginal(jax.random.PRNGKey(0), process, num_points, process.t_min)
            exact = truth.log_prob(process, x, process.t_min)
            time_variable = "log_snr" if process_name == "ddpm" else "t"
            for rtol in rtols:
                common = dict(rtol=rtol, atol=rtol, time_variable=time_variable)
                denoiser = truth.denoiser(process)
                result = likelihood.ode_log_likelihood(
                    denoiser,
                    x,
                    prior_logp=functools.partial(truth.log_prob, process, t=process.T),
                    **common,
                )
                standard = result.delta_log_prob + process.prior_logp(result.latent)
                records.append(
                    {
                        "preset": preset_name,
                        "process": process_name,
                        "time_variable": time_variable,
                        "rtol": rtol,
                        "num_points": num_points,
                        "max_abs_error_per_dim_exact_prior": float(
                            jnp.max(jnp.abs(result.log_prob - exact)) / truth.dim
                        ),
                        "max_abs_error_per_dim_standard_prior": float(
                            jnp.max(jnp.abs(standard - exact)) / truth.dim
                        ),
                        "nfe": int(result.nfe),
                    }
                )
    return {"records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one preset, one tolerance")
    print(json.dumps(run(parser.parse_args().quick), indent=1))


if __name__ == "__main__":
    main()
