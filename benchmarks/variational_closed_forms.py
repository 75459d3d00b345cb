"""The variational view against closed forms on Gaussian data: the figures the tests assert on.

Each figure is computed by the reference functions of ``tests/test_variational.py`` (imported from
that file, so the numbers printed are exactly the ones the tests check), in float64:

* ``exact_bound``: the bound of the exact model (oracle mean, analytic variance at the exact
  E||eps_pred||^2) against the hand-written sum of Gaussian KLs, max relative difference over four x_0,
  for DDPM (T = 10, 1000) and SMLD (10 levels); and the hand-written sum with the exact prior q(x_T)
  against -log q(x_0) (Ho et al. 2020, eq. 5; the two joints coincide);
* ``continuous_limit``: Kingma et al. 2021's continuous bound of N(0.3, 0.5^2) data under a linear
  log-SNR schedule, the data's entropy, and the discrete bound on K uniform steps with the posterior
  variances: gaps, the fitted rate and Richardson's extrapolation;
* ``analytic_variance``: Bao et al. 2022's Gamma_t by Monte Carlo with M samples (errors in standard
  errors) and the resulting variance's max relative error;
* ``learned_variance``: the hybrid-loss-trained variance against the optimum (max relative error);
* ``schedule_variance`` (omit with --quick): the VDM estimator's variance before and after training
  the schedule, against its closed forms for the linear schedule and its minimum.

    python -m benchmarks.variational_closed_forms [--quick]

prints one JSON object with those keys.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402  (after enabling float64)
import numpy as np  # noqa: E402

from diffusion import variational  # noqa: E402


def _load_references():
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "test_variational.py"
    spec = importlib.util.spec_from_file_location("variational_references", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain(value):
    """JSON-ready: numpy scalars and arrays to floats and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    array = np.asarray(value)
    return array.tolist() if array.ndim else float(array)


def exact_bound(ref) -> dict:
    x0_values = np.array([-1.0, 0.1, 0.3, 1.2])
    figures = {}
    for name, (make_process, make_chain, prior_std) in ref.CHAINS.items():
        process, (signal, noise) = make_process(), make_chain()
        model = ref.exact_model(process, signal, noise)
        terms = ref.expected_terms(model, x0_values, process.chain_times)
        library = np.asarray(
            variational.prior_kl(process, jnp.asarray(x0_values)[:, None])
        ) + terms.sum(1)
        by_hand = [ref.by_hand_bound(signal, noise, prior_std, x0) for x0 in x0_values]
        nll = 0.5 * math.log(2 * math.pi * ref.S**2) + (x0_values - ref.MU) ** 2 / (2 * ref.S**2)
        figures[name] = {
            "bound_nats": library,
            "max_relative_difference": np.abs(library / [b for b, _ in by_hand] - 1).max(),
            "exact_prior_minus_nll_max_abs": np.abs(np.array([e for _, e in by_hand]) - nll).max(),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the schedule training")
    args = parser.parse_args()
    ref = _load_references()
    analytic = ref.analytic_variance_figures((64, 1024, 16384))
    analytic_runs = {
        num_samples: {
            "max_gamma_error_in_standard_errors": run["gamma_error_in_standard_errors"].max(),
            "max_relative_variance_error": run["max_relative_variance_error"],
        }
        for num_samples, run in analytic["runs"].items()
    }
    initial_error, error = ref.learned_head_errors()
    results = {
        "exact_bound": exact_bound(ref),
        "continuous_limit": ref.continuous_limit_figures(),
        "analytic_variance": {
            "exact_gamma_max_relative_variance_error": analytic["exact_gamma_variance_error"],
            "monte_carlo": analytic_runs,
        },
        "learned_variance": {
            "initial_max_relative_error": initial_error,
            "max_relative_error": error,
        },
    }
    if not args.quick:
        figures = ref.schedule_training_figures()
        figures.pop("gamma")
        results["schedule_variance"] = figures
    print(json.dumps(_plain(results), indent=1))


if __name__ == "__main__":
    main()
