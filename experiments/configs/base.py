"""The base configuration every experiment starts from, and the building blocks the small files share.

Key names follow score_sde where it had one (training.n_iters, training.batch_size, training.log_freq,
training.snapshot_freq, training.snapshot_sampling, sampling.method, eval.batch_size, model.nf,
model.ch_mult, data.dataset, data.centered, seed). Every option of every registered sampler has a key
``sampling.options.<sampler>.<option>`` holding the registry's default, so
``--config.sampling.method=pc --config.sampling.options.pc.snr=0.2`` works and a misspelt key is
rejected. A config says its process,
parameterization, loss weighting, model, optimiser, sampler and evaluation; experiments/run.py turns
it into library objects and rejects impossible combinations before building anything.
"""

from __future__ import annotations

import collections.abc
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from diffusion import samplers


def _placeholder_type(annotation: Any) -> type:
    """The type that fills an ``X | None`` option: X, or tuple for a sequence (e.g. DPM-Solver-fast's
    ``orders: Sequence[int] | None``), as ml_collections' placeholders take one concrete type."""
    (kind,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    origin = typing.get_origin(kind) or kind
    return tuple if issubclass(origin, collections.abc.Sequence) else origin


def _sampler_options() -> ml_collections.ConfigDict:
    """One sub-dict per registered sampler, holding its options at the registry's defaults."""
    options = ml_collections.ConfigDict()
    for name, spec in sorted(samplers.SAMPLERS.items()):
        hints = typing.get_type_hints(spec.fn)
        sub = ml_collections.ConfigDict()
        for option, default in spec.defaults.items():
            # None defaults become placeholders of the option's annotated type, so that a
            # command-line value can fill them (--config.sampling.options.adaptive.max_nfe=200).
            if default is None:
                sub[option] = config_dict.placeholder(_placeholder_type(hints[option]))
            else:
                sub[option] = default
        options[name] = sub
    return options


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults shared by all experiments (score_sde's training hyperparameters)."""
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "mnist"  # mnist | fashion_mnist | cifar10 | digits | a toy name
    config.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS default)
    config.data.idx_dir = config_dict.placeholder(str)  # directory of IDX files (MNIST-like only)
    config.data.centered = True  # data in [-1, 1]; False: [0, 1] (score_sde's VE configs)
    config.data.dequantize = False
    config.data.random_flip = False

    config.process = ml_collections.ConfigDict()
    config.process.name = "vp"

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.parameterization = "eps"
    config.model.time_input = "999t"
    config.model.sigma_data = 0.5
    config.model.num_classes = config_dict.placeholder(int)
    config.model.nf = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (14,)
    config.model.dropout = 0.1
    config.model.resamp_with_conv = True
    config.model.embedding_type = "positional"
    config.model.fourier_scale = 16.0
    config.model.skip_rescale = False
    config.model.scale_by_sigma = False
    # The reverse variance of ancestral sampling with variance='model' and of the VLB:
    # fixed_small (beta-tilde) | fixed_large (beta) | learned (Nichol & Dhariwal 2021: the network
    # outputs 2C channels; needs training.weighting='hybrid') | analytic (Bao et al. 2022).
    config.model.variance = "fixed_small"

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128
    config.training.n_iters = 200_000
    config.training.log_freq = 100
    config.training.snapshot_freq = 10_000
    config.training.snapshot_sampling = True
    config.training.snapshot_num_samples = 64
    config.training.checkpoint_freq = 5_000
    config.training.keep_checkpoints = 3
    # A DenoisingLoss weighting, or 'hybrid' (Nichol & Dhariwal 2021's L_simple + lambda_vlb L_vlb,
    # discrete chains with model.variance='learned') or 'vlb' (Kingma et al. 2021's VLB, VDMLoss,
    # continuous processes; with process.name='learned' it also trains the schedule).
    config.training.weighting = "simple"
    config.training.lambda_vlb = 0.001  # lambda of 'hybrid' (Nichol & Dhariwal 2021, Sec. 3.1)
    config.training.vdm_num_steps = 0  # 'vlb': 0 continuous time, N: N discrete steps (VDM eq. 11)
    # Probability of replacing a label by the null label (classifier-free guidance training, Ho &
    # Salimans 2022); needs model.num_classes (0.1 in the conditional configs).
    config.training.label_dropout = 0.0
    config.training.time_sampling = "uniform"
    config.training.reduction = "mean"
    config.training.min_snr_gamma = 5.0
    config.training.ema_decay = 0.9999
    config.training.ema_warmup = False
    config.training.parallelism = "jit"  # jit (XLA partitions the step) | shard_map (per device)
    config.training.steps_per_call = 1
    # Memory and speed (U-Net only): jax.checkpoint of the residual and attention blocks
    # ('none' | 'blocks': recompute each block in the backward pass | 'convs': keep only the
    # convolution outputs), and the compute dtype of convolutions, dense layers and activations
    # (float32 | bfloat16; parameters, optimiser state and the loss stay float32).
    config.training.remat = "none"
    config.training.compute_dtype = "float32"
    # Stop after this many consecutive updates with a non-finite loss or gradient (each is skipped).
    config.training.max_nonfinite_steps = 10

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.warmup = 5000
    config.optim.decay = "constant"
    config.optim.grad_clip = 1.0

    config.sampling = ml_collections.ConfigDict()
    config.sampling.method = "euler_maruyama"
    config.sampling.grid = "uniform_t"
    config.sampling.num_steps = 1000
    config.sampling.t_end = config_dict.placeholder(float)  # None: the process's default
    config.sampling.rho = config_dict.placeholder(float)  # karras / flow_t exponent; None: 7 / 2
    config.sampling.denoise_final = True
    # The final step to sigma = 0 (diffusion.samplers.api): 1 Tweedie's step; 2, 3 the last 2 or 3
    # x0 predictions extrapolated to sigma = 0 (deterministic samplers only).
    config.sampling.denoise_order = 1
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    config.sampling.options = _sampler_options()
    # Conditional sampling (diffusion.guidance). Labels: 'all' (an equal share of every class, one
    # grid row per class), one label '3' or a list '0,4,7'; used by a conditional model
    # (model.num_classes) and by classifier guidance.
    config.sampling.labels = "all"
    # Classifier-free guidance scale w: eps_uncond + w (eps_cond - eps_uncond); w = 1 conditional.
    config.sampling.guidance_scale = 1.0
    # (low, high] of EDM's noise level sigma / alpha where w applies (Kynkaanniemi et al. 2024);
    # None: everywhere. Outside it w = 1.
    config.sampling.guidance_interval = config_dict.placeholder(tuple)
    config.sampling.guidance_rescale = 0.0  # phi of rescaled CFG (Lin et al. 2024, Sec. 3.4)
    # Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier trained on
    # the training split and cached in DIR/classifiers/; 0 disables.
    config.sampling.classifier_scale = 0.0
    config.sampling.noisy_classifier_steps = 2000
    config.sampling.noisy_classifier_batch_size = 128
    config.sampling.noisy_classifier_learning_rate = 1e-3
    config.sampling.noisy_classifier_channels = (32, 64)
    config.sampling.noisy_classifier_num_blocks = 1
    # Inpainting: a named region to generate (diffusion.guidance.MASKS, e.g. left_half,
    # center_square); the known part comes from the test split (toy data: fresh points).
    config.sampling.inpaint_mask = config_dict.placeholder(str)
    config.sampling.inpaint_resamplings = 1  # RePaint's resampling (Lugmayr et al. 2022); 1: none
    config.sampling.inpaint_jump_length = 1
    # The rule of ancestral sampling with variance='model' (None: model.variance); e.g.
    # 'fixed_small' samples a learned-variance network with beta-tilde.
    config.sampling.reverse_variance = config_dict.placeholder(str)

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256
    config.eval.num_samples = 1000
    config.eval.bpd = True
    config.eval.bpd_num_examples = 256
    config.eval.bpd_rtol = 1e-5
    config.eval.feature_extractor = "classifier"  # classifier | inception | none
    config.eval.inception_weights = config_dict.placeholder(str)
    # The in-project classifier (feature extractor and class histogram): 91.2% on Fashion-MNIST.
    config.eval.classifier_steps = 2500
    config.eval.classifier_batch_size = 128
    config.eval.classifier_learning_rate = 3e-3
    config.eval.classifier_max_shift = 0
    config.eval.classifier_weight_decay = 0.0
    config.eval.sweep_solvers = (
        "ddim",
        "heun",
        "dpm_solver_pp_2m",
        "dpm_solver_fast",
        "unipc",
        "deis",
    )
    # Odd and even budgets: Heun with the final step spends 2 n + 1.
    config.eval.sweep_nfes = (5, 10, 15, 25, 50)
    # flow_t: the rectified flow's grid on any process, the best grid of benchmarks/solver_accuracy.
    config.eval.sweep_grids = ("uniform_t", "uniform_log_snr", "flow_t")
    config.eval.sweep_num_samples = 256
    # Every run ends at sigma = 0 with a final step of this order, and the errors are measured
    # against the ODE's end at sigma = 0; False: the runs and the reference end at sampling.t_end.
    config.eval.sweep_denoise_final = True
    config.eval.sweep_denoise_order = 2
    # Error against time: one run per solver and grid at this NFE (0: none).
    config.eval.sweep_trajectory_nfe = 10
    # A conditional model: conditioning accuracy and FD per classifier-free guidance scale.
    config.eval.guidance_scales = (1.0,)
    # Bits/dim from the variational bound (diffusion.variational): every term of a discrete chain
    # (vlb_num_terms = 0) or n importance-sampled ones (uniform over the terms, unbiased); a
    # continuous process gets Kingma et al. 2021's continuous bound with n (>= 1) time samples.
    config.eval.vlb = False
    config.eval.vlb_num_examples = 256
    config.eval.vlb_num_terms = 0
    # The analytic variance's Gamma_t (Bao et al. 2022): batches of training data per time, at
    # the chain times (continuous processes: analytic_num_times uniform times); cached in DIR/analytic.
    config.eval.analytic_num_batches = 4
    config.eval.analytic_num_times = 100
    return config


# ------------------------------------------------------------------------------ building blocks
def set_process(config: ml_collections.ConfigDict, name: str, **fields) -> None:
    """Replace config.process by process ``name`` with the given fields (names of its dataclass)."""
    config.process = ml_collections.ConfigDict({"name": name, **fields})


def mnist_like(config: ml_collections.ConfigDict, dataset: str, idx_dir: str | None = None) -> None:
    """28x28x1 data (MNIST or Fashion-MNIST), from TFDS or, with ``idx_dir``, from IDX files."""
    config.data.dataset = dataset
    if idx_dir is not None:
        config.data.idx_dir = idx_dir


def use_mlp(config: ml_collections.ConfigDict, width: int = 256, num_blocks: int = 3) -> None:
    """The residual MLP of diffusion.models for 2-D and low-dimensional data."""
    parameterization, time_input = config.model.parameterization, config.model.time_input
    config.model = ml_collections.ConfigDict(
        {
            "name": "mlp",
            "parameterization": parameterization,
            "time_input": time_input,
            "sigma_data": 0.5,
            "num_classes": config_dict.placeholder(int),
            "width": width,
            "num_blocks": num_blocks,
            "embedding_dim": 64,
            "embedding_type": "positional",
            "fourier_scale": 16.0,
            "dropout": 0.0,
            "scale_by_sigma": False,
            "variance": "fixed_small",
        }
    )


def use_learned_schedule(
    config: ml_collections.ConfigDict,
    gamma_min: float = -13.3,
    gamma_max: float = 5.0,
    num_hidden: int = 1024,
) -> None:
    """Kingma et al. 2021's learned noise schedule (process.name='learned', a monotone network for
    gamma = -log SNR with fixed end points, defaults those of their CIFAR-10 runs), trained with
    their VLB (training.weighting='vlb'), whose gradient trains the schedule to minimise the
    estimator's variance (their Sec. 5.2)."""
    set_process(config, "learned", gamma_min=gamma_min, gamma_max=gamma_max, num_hidden=num_hidden)
    config.training.weighting = "vlb"
    config.training.time_sampling = "uniform"


def ncsnpp_style(config: ml_collections.ConfigDict) -> None:
    """NCSN++'s conditioning (Song et al. 2021): Fourier features of log sigma, output scaled by 1/sigma.

    The network's raw output is then the score itself (parameterization 'score').
    """
    config.model.parameterization = "score"
    config.model.time_input = "log_sigma"
    config.model.embedding_type = "fourier"
    config.model.scale_by_sigma = True
    config.model.skip_rescale = True


def ve_sigma_max_for(dataset: str) -> float:
    """sigma_max by Song & Ermon 2020 (NCSNv2) technique 1: about the largest pairwise data distance.

    Measured on [0, 1]-scaled data: Fashion-MNIST 22.4 (6,000 random training images), 8x8 digits 4.8;
    MNIST shares Fashion-MNIST's 28x28 geometry; CIFAR-10 uses score_sde's 50.
    """
    return {"digits": 5.0, "cifar10": 50.0}.get(dataset, 25.0)


# ------------------------------------------------------------------------------ the six views
VIEWS = ("vp", "subvp", "ve", "ddpm", "smld", "edm", "flow")


def set_view(config: ml_collections.ConfigDict, view: str, dataset: str) -> None:
    """Process, parameterization, loss and sampler of one view of the model family, on ``dataset``.

    vp / subvp: score_sde's continuous VP and sub-VP SDEs (beta 0.1 -> 20), eps prediction with a
      999 t positional input, L_simple, reverse-SDE Euler-Maruyama with 1000 steps and a final
      denoising step (score_sde's 'noise_removal').
    ve: the VE SDE (sigma_min 0.01, sigma_max by NCSNv2's technique 1) on [0, 1] data with NCSN++'s
      conditioning, lambda = sigma^2, PC sampling (reverse diffusion + Langevin, snr 0.16).
    ddpm: Ho et al. 2020 as taught by Higham, Higham & Grindrod 2023: linear betas 1e-4 -> 0.02 over
      T = 500 steps, eps loss on uniform integer steps, ancestral sampling with beta-tilde and no
      noise at the last step (the final denoising step), network conditioned on the step index.
    smld: NCSN (Song & Ermon 2019): 10 geometric levels 1 -> 0.01 on [0, 1] data, sigma^2-weighted
      loss on uniform levels, annealed Langevin (100 steps per level, step_lr 2e-5) and a final
      denoising step (NCSNv2).
    edm: Karras et al. 2022: EDM preconditioning, loss weighting and log-normal noise levels; Heun on
      the rho = 7 grid with 18 levels and the last step to sigma = 0 (35 NFE, their Alg. 1).
    flow: rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022): the straight path
      x_t = (1 - t) x0 + t eps, the network predicting the velocity eps - x0 with the flow-matching
      loss and logit-normal times (Esser et al. 2024, Sec. 3.1), Euler steps uniform in t.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; accepted: {', '.join(VIEWS)}")
    if view in ("vp", "subvp"):
        set_process(config, view, beta_min=0.1, beta_max=20.0)
        config.sampling.method = "euler_maruyama"
    elif view == "ve":
        set_process(config, "ve", sigma_min=0.01, sigma_max=ve_sigma_max_for(dataset))
        config.data.centered = False
        ncsnpp_style(config)
        config.training.weighting = "sigma_sq"
        config.sampling.method = "pc"
    elif view == "ddpm":
        set_process(
            config, "ddpm", num_steps=500, schedule="linear", beta_start=1e-4, beta_end=0.02
        )
        config.model.time_input = "index"
        config.training.time_sampling = "discrete"
        config.sampling.method = "ancestral"
        config.sampling.grid = "linspace"
        config.sampling.num_steps = 499
    elif view == "smld":
        set_process(config, "smld", num_levels=10, sigma_min=0.01, sigma_max=1.0)
        config.data.centered = False
        ncsnpp_style(config)
        config.training.weighting = "sigma_sq"
        config.training.time_sampling = "discrete"
        config.sampling.method = "annealed_langevin"
        config.sampling.grid = "linspace"
        config.sampling.num_steps = 9
        config.sampling.options.annealed_langevin.n_steps_each = 100
        config.sampling.options.annealed_langevin.step_lr = 2e-5
    elif view == "flow":
        set_process(config, "flow", shift=1.0)
        config.model.parameterization = "velocity"
        config.training.weighting = "velocity"
        config.training.time_sampling = "logit_normal"
        config.sampling.method = "euler"
        config.sampling.grid = "uniform_t"
        config.sampling.num_steps = 50
    else:  # edm
        set_process(config, "edm", sigma_min=0.002, sigma_max=80.0)
        config.model.parameterization = "edm"
        config.model.time_input = "quarter_log_sigma"
        config.training.weighting = "edm"
        config.training.time_sampling = "log_normal"
        config.sampling.method = "heun"
        config.sampling.grid = "karras"
        config.sampling.num_steps = 17


def mnist_view_config(view: str, dataset: str = "mnist", idx_dir: str | None = None):
    """A view of the family on 28x28x1 digits or fashion (TFDS, or IDX files with ``idx_dir``)."""
    config = get_base_config()
    mnist_like(config, dataset, idx_dir)
    set_view(config, view, dataset)
    if view == "ddpm":
        # Higham et al.'s network size: residual and attention blocks, 12,908,113 parameters here.
        config.model.nf = 48
        config.model.ch_mult = (1, 2, 2, 4)
        config.model.num_res_blocks = 3
        config.model.attn_resolutions = (14, 7)
    return config


def toy_config(view: str, dataset: str = "ring8_2d"):
    """A 2-D view: the residual MLP on ``dataset`` (an oracle preset has exact scores to compare with).

    The network conditions on 999 t for every process (t maps monotonically to the noise level) and
    predicts eps with L_simple (the flow view: the velocity with its own loss); sampling is the
    probability-flow ODE with third-order multistep DPM-Solver.
    """
    config = get_base_config()
    config.data.dataset = dataset
    set_view(config, view, dataset)
    if view != "flow":  # the flow view's velocity and its loss are what it is about
        config.model.parameterization = "eps"
        config.training.weighting = "simple"
    config.model.time_input = "999t"
    config.model.embedding_type = "positional"
    config.model.scale_by_sigma = False
    use_mlp(config)
    config.training.batch_size = 512
    config.training.n_iters = 16_000  # under 5 minutes on a 2-core CPU
    config.training.log_freq = 1000
    config.training.snapshot_freq = 4000
    config.training.checkpoint_freq = 4000
    config.training.snapshot_num_samples = 2000
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True
    config.optim.lr = 1e-3
    config.optim.warmup = 500
    config.sampling.method = "dpm_solver_multistep"
    config.sampling.grid = "uniform_log_snr"
    config.sampling.num_steps = 50
    config.sampling.num_samples = 5000
    config.sampling.batch_size = 5000
    config.eval.num_samples = 10_000  # the sliced-W2 noise floor shrinks like 1 / sqrt(samples)
    config.eval.feature_extractor = "none"
    config.eval.sweep_solvers = (
        "ddim",
        "heun",
        "dpm_solver_multistep",
        "dpm_solver_pp_2m",
        "unipc",
        "deis",
    )
    config.eval.sweep_grids = ("uniform_t", "uniform_log_snr", "quadratic_t", "karras", "flow_t")
    config.eval.sweep_nfes = (5, 10, 15, 25, 50)
    config.eval.sweep_num_samples = 2000
    return config


def digits_config(view: str):
    """A view on scikit-learn's 8x8 digits (offline): a small U-Net (701,345 parameters for eps
    prediction) that trains on the 1,497 training digits in a few minutes on a 2-core CPU, and the
    in-project classifier's settings for 8x8 digits (98.3-99.0 % test accuracy over seeds)."""
    config = get_base_config()
    config.data.dataset = "digits"
    set_view(config, view, "digits")
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.training.batch_size = 128
    config.training.n_iters = 1500
    config.training.log_freq = 100
    config.training.snapshot_freq = 500
    config.training.checkpoint_freq = 500
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True
    config.optim.lr = 2e-3
    config.optim.warmup = 200
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    config.eval.num_samples = 500
    config.eval.classifier_steps = 1500
    config.eval.classifier_learning_rate = 2e-3
    config.eval.classifier_max_shift = 1
    config.eval.classifier_weight_decay = 0.05
    return config


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # `apt install dataset-fashion-mnist`
