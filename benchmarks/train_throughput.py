"""Training-step throughput against the machine's measured peak and against the PyTorch peer.

Cases (global batch 128 unless told otherwise; synthetic data, whose content does not change the
cost):

* ``vp_digits``, ``vp_mnist``, ``vp_cifar10``: the networks, losses and optimisers of those configs,
  built with ``experiments.build.build(experiments.configs.<name>.get_config())``.
* ``peer_unet``: ``UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
  dropout=0)`` on 1x32x32 images, 1,623,169 parameters, with vp_mnist's loss (VP SDE, eps, L_simple,
  time input 999 t) and optimiser (Adam 2e-4, clipping at 1) and EMA 0.9999. The PyTorch peer is
  diffusers' ``UNet2DModel`` with 32/64/64 channels, 2 residual blocks per level and attention at
  the lowest level (also 1,623,169 parameters, checked), trained with the same eps-MSE and Adam;
  it runs in a worker subprocess (the optional ``bench`` extra: torch, diffusers), and the two
  sides alternate step by step in the same run, so the ratio sees the same machine load.

Each JAX case compiles ``jax.jit(train_step, donate_argnums=0)`` of ``diffusion.training`` ahead of
time (``compile_s``), reads XLA's cost analysis (``flops_per_step``, ``temp_bytes``), then times
``timed_steps`` steps after one warm-up step; ``examples_per_s`` is batch / median step time.
``cpu_s_per_step`` is the process's CPU time (user + system) per step: on a shared machine it
changes less with other jobs' load than the wall time does. ``peak_conv_flops_per_s`` and
``peak_matmul_flops_per_s`` are measured in the same run (a 3x3 convolution, 64 -> 64 channels at
32x32, batch 128, NHWC, and a square matmul, both in the step's dtype); ``utilization`` is
achieved / conv peak. ``--profile`` adds, for peer_unet, the thread time per kind of operation from
XLA's profile (convolutions forward / input gradient / kernel gradient, GroupNorm, ...).

    python -m benchmarks.train_throughput [--quick] [--cases=a,b] [--steps=N] [--dtypes=float32,bfloat16]
        [--remat=none|blocks|convs] [--no-peer] [--profile] [--batch-size=B]

``--quick``: peer_unet (with the peer) and vp_digits, 2 timed steps each, within 3 minutes on a quiet
2-core CPU. Prints one JSON object: {"machine": {...}, "peaks": {...}, "records": [...]}.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

CONFIG_CASES = ("vp_digits", "vp_mnist", "vp_cifar10")
PEER_CASE = "peer_unet"
PEER_IMAGE_SHAPE = (32, 32, 1)
PEER_PARAMS = 1_623_169
GLOBAL_BATCH = 128
VECTOR_FLAGS = re.compile(r"^(avx\w*|fma\w*|f16c|amx\w*|sse4_\d|ssse3|sve\w*|neon|asimd\w*)$")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict:
    """CPU model, vector extensions (from /proc/cpuinfo), cores, load, library versions."""
    import jax

    info = {
        "cpu_model": platform.processor() or platform.machine(),
        "vector_extensions": [],
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    if model:
        info["cpu_model"] = model.group(1).strip()
    if flags:
        info["vector_extensions"] = sorted(
            flag for flag in flags.group(1).split() if VECTOR_FLAGS.match(flag)
        )
    return info


def median_time(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (blocking) over ``repeats`` calls after one warm-up."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_peaks(dtype_name: str, quick: bool) -> dict:
    """Measured FLOP/s of a large 3x3 convolution (forward) and a square matmul in ``dtype``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dtype = jnp.dtype(dtype_name)
    on_cpu = jax.devices()[0].platform == "cpu"
    batch, size, channels = (128, 32, 64) if on_cpu else (256, 64, 256)
    keys = jax.random.split(jax.random.key(0), 3)
    images = jax.random.normal(keys[0], (batch, size, size, channels), dtype)
    kernel = jax.random.normal(keys[1], (3, 3, channels, channels), dtype)
    conv = jax.jit(
        lambda x, k: lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    conv_flops = 2 * batch * size * size * 9 * channels * channels
    n = 2048 if on_cpu else 8192
    matrix = jax.random.normal(keys[2], (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    repeats = 3 if quick else 7
    return {
        "dtype": dtype_name,
        "conv_shape": f"{batch}x{size}x{size}x{channels} -> {channels}, 3x3",
        "peak_conv_flops_per_s": conv_flops / median_time(conv, images, kernel, repeats=repeats),
        "matmul_shape": f"{n}x{n}x{n}",
        "peak_matmul_flops_per_s": 2 * n**3 / median_time(matmul, matrix, matrix, repeats=repeats),
    }


@dataclasses.dataclass
class Case:
    """A network with its loss, optimiser and data shape, ready to time."""

    name: str
    model: object
    loss: object
    optimizer: object
    learning_rate_fn: object
    ema_decay: float
    data_shape: tuple[int, ...]


def build_case(name: str, dtype_name: str, remat: str) -> Case:
    """The case's objects from its config (peer_unet: vp_mnist's loss with the matched U-Net)."""
    import importlib

    import jax.numpy as jnp

    from diffusion.models import UNet
    from experiments.build import build

    config_name = "vp_mnist" if name == PEER_CASE else name
    config = importlib.import_module(f"experiments.configs.{config_name}").get_config()
    experiment = build(config)
    model, data_shape = experiment.model, tuple(experiment.data_shape)
    if name == PEER_CASE:
        model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0)
        data_shape = PEER_IMAGE_SHAPE
    dtype = None if dtype_name == "float32" else jnp.dtype(dtype_name)
    model = model.clone(dtype=dtype, remat=remat)
    loss = experiment.loss
    loss = dataclasses.replace(loss, denoiser=loss.denoiser.replace(apply_fn=model.apply))
    return Case(
        name=name,
        model=model,
        loss=loss,
        optimizer=experiment.optimizer,
        learning_rate_fn=experiment.learning_rate_fn,
        ema_decay=float(config.training.ema_decay),
        data_shape=data_shape,
    )


class JaxSide:
    """One case's compiled train step and its state, stepping on a fixed synthetic batch."""

    def __init__(self, case: Case, batch_size: int) -> None:
        import jax
        import numpy as np

        from diffusion import training

        self.case, self.batch_size = case, batch_size
        example = np.zeros((1, *case.data_shape), np.float32)
        params = jax.jit(case.model.init)(jax.random.key(0), example, np.zeros((1,), np.float32))
        self.param_count = int(sum(leaf.size for leaf in jax.tree.leaves(params)))
        step_fn = training.make_train_step(
            case.loss,
            case.optimizer,
            learning_rate_fn=case.learning_rate_fn,
            ema_decay=case.ema_decay,
        )
        self.state = training.create_train_state(params, case.optimizer, jax.random.key(1))
        images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *case.data_shape))
        self.batch = {"image": jax.device_put(images.astype(np.float32))}
        start = time.perf_counter()
        self.compiled = jax.jit(step_fn, donate_argnums=0).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.flops_per_step = float(cost.get("flops", float("nan")))
        self.temp_bytes = int(self.compiled.memory_analysis().temp_size_in_bytes)
        self.platform = jax.devices()[0].platform
        self.step_s: list[float] = []
        self.cpu_s: list[float] = []

    def step(self, record: bool = True) -> None:
        import jax

        start, cpu_start = time.perf_counter(), cpu_seconds()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        if record:
            self.step_s.append(time.perf_counter() - start)
            self.cpu_s.append(cpu_seconds() - cpu_start)

    def record(self, peaks: dict) -> dict:
        import numpy as np

        step_s = float(np.median(self.step_s))
        achieved = self.flops_per_step / step_s
        return {
            "config": self.case.name,
            "batch": self.batch_size,
            "dtype": peaks["dtype"],
            "remat": self.case.model.remat,
            "param_count": self.param_count,
            "examples_per_s": self.batch_size / step_s,
            "step_s": self.step_s,
            "cpu_s_per_step": float(np.median(self.cpu_s)),
            "compile_s": self.compile_s,
            "flops_per_step": self.flops_per_step,
            "achieved_flops_per_s": achieved,
            "peak_conv_flops_per_s": peaks["peak_conv_flops_per_s"],
            "peak_matmul_flops_per_s": peaks["peak_matmul_flops_per_s"],
            "utilization": achieved / peaks["peak_conv_flops_per_s"],
            "utilization_of_matmul_peak": achieved / peaks["peak_matmul_flops_per_s"],
            "temp_bytes": self.temp_bytes,
        }


# ------------------------------------------------------------------------------------ the peer
def peer_worker(batch_size: int) -> None:
    """Subprocess side: build the diffusers peer, then run one train step per 'step' line on
    stdin, answering with a JSON line {"step_s", "cpu_s"}; the first line it prints describes it."""
    import torch
    from diffusers import UNet2DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=PEER_IMAGE_SHAPE[0],
        in_channels=PEER_IMAGE_SHAPE[2],
        out_channels=PEER_IMAGE_SHAPE[2],
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    images = (
        torch.rand(batch_size, PEER_IMAGE_SHAPE[2], *PEER_IMAGE_SHAPE[:2], device=device) * 2 - 1
    )
    # VP SDE (beta 0.1 -> 20) marginals at uniform t, as the JAX side's loss draws them.
    beta_min, beta_max = 0.1, 20.0

    def train_step() -> None:
        t = torch.rand(batch_size, device=device) * (1 - 1e-5) + 1e-5
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha = torch.exp(log_alpha)[:, None, None, None]
        sigma = torch.sqrt(1 - alpha**2)
        eps = torch.randn_like(images)
        eps_pred = model(alpha * images + sigma * eps, 999 * t).sample
        loss = ((eps_pred - eps) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    description = {
        "param_count": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    print(json.dumps(description), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, cpu_start = time.perf_counter(), cpu_seconds()
        train_step()
        print(
            json.dumps({"step_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu_start})
        )
        sys.stdout.flush()


class PeerSide:
    """The PyTorch peer in a worker subprocess, stepped on request."""

    def __init__(self, batch_size: int) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.train_throughput",
                "--peer-worker",
                f"--batch-size={batch_size}",
            ],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the peer worker exited (is the 'bench' extra installed?)")
        self.description = json.loads(line)
        self.step_s: list[float] = []
        self.cpu_s: list[float] = []

    def step(self, record: bool = True) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        if record:
            self.step_s.append(reply["step_s"])
            self.cpu_s.append(reply["cpu_s"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def peer_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("torch", "diffusers"))


# ------------------------------------------------------------------------------ XLA's profile
def _hlo_instructions(hlo_text: str) -> dict[str, str]:
    """Each HLO instruction's name -> its line plus the body of the computation it calls."""
    computations = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\{\n(.*?)\n\}\n", hlo_text, re.S | re.M)
    }
    instructions = {}
    for body in computations.values():
        for line in body.splitlines():
            match = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
            if not match:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            instructions[match.group(1)] = line + (
                "\n" + computations.get(called.group(1), "") if called else ""
            )
    return instructions


def _op_category(text: str) -> str:
    """Kind of work an HLO instruction (with its fused body) does, from its ops and op names."""
    ops = re.findall(r"= \S+ (convolution|dot)\(", text)
    names = re.findall(r'op_name="([^"]*)"', text)
    name = max(names, key=len) if names else ""
    if "convolution" in ops:
        window = re.search(r"window=\{size=(\d+)x(\d+)", text)
        if window and int(window.group(1)) > 7:  # the kernel gradient: a window of image size
            return "conv kernel-grad"
        return "conv input-grad" if "transpose(" in name else "conv forward"
    if "dot" in ops:
        return "dot backward" if "transpose(" in name else "dot forward"
    for key, label in (
        ("GroupNorm", "groupnorm"),
        ("concatenate", "concatenate"),
        ("Upsample", "upsample"),
        ("Downsample", "downsample"),
        ("AttentionBlock", "attention (softmax, scaling)"),
        ("ConditioningEmbedding", "time embedding"),
    ):
        if key in name:
            return label
    if "UNet" in name:
        return "other network elementwise"
    if not name:
        return "unattributed (copies, transposes)"
    return "outside the network (loss, optimizer, EMA)"


def profile_step(side: JaxSide) -> dict[str, float]:
    """Thread time (s) per category of one train step, from XLA's profile (jax.profiler)."""
    import jax
    from jax.profiler import ProfileData

    directory = tempfile.mkdtemp(prefix="throughput-profile-")
    try:
        with jax.profiler.trace(directory):
            side.step(record=False)
        (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    durations: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                durations[event.name] += event.duration_ns
    instructions = _hlo_instructions(side.compiled.as_text())
    categories: collections.Counter[str] = collections.Counter()
    for name, nanoseconds in durations.items():
        if name in instructions:  # runtime bookkeeping events carry other names
            categories[_op_category(instructions[name])] += nanoseconds / 1e9
    return dict(categories.most_common())


# ------------------------------------------------------------------------------------ main
def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def run_case(name, args, peaks, peer: PeerSide | None, timed_steps: int) -> dict:
    side = JaxSide(build_case(name, peaks["dtype"], args.remat), args.batch_size)
    available = available_memory_bytes()
    if side.platform == "cpu" and available is not None and side.temp_bytes > 0.9 * available:
        # Running would take the machine's memory (and the OOM killer takes the process).
        return {
            "config": name,
            "batch": args.batch_size,
            "dtype": peaks["dtype"],
            "param_count": side.param_count,
            "compile_s": side.compile_s,
            "flops_per_step": side.flops_per_step,
            "temp_bytes": side.temp_bytes,
            "skipped": f"XLA needs {side.temp_bytes / 2**30:.1f} GiB of scratch; "
            f"{available / 2**30:.1f} GiB available (try a smaller --batch-size)",
        }
    side.step(record=False)  # warm-up
    if peer is not None:
        peer.step(record=False)
    for _ in range(timed_steps):  # the two sides alternate, so both see the same load
        side.step()
        if peer is not None:
            peer.step()
    record = side.record(peaks)
    if peer is not None:
        import numpy as np

        peer_step_s = float(np.median(peer.step_s))
        record.update(
            peer_examples_per_s=args.batch_size / peer_step_s,
            peer_step_s=peer.step_s,
            peer_cpu_s_per_step=float(np.median(peer.cpu_s)),
            peer=peer.description,
            ratio_to_peer=record["examples_per_s"] / (args.batch_size / peer_step_s),
            cpu_ratio_to_peer=float(np.median(peer.cpu_s)) / record["cpu_s_per_step"],
        )
    if args.profile and name == PEER_CASE:
        record["profile_thread_s"] = profile_step(side)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="peer_unet and vp_digits, 2 steps")
    parser.add_argument("--cases", default=None, help="comma-separated cases (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--dtypes", default="float32", help="compute dtypes, e.g. float32,bfloat16")
    parser.add_argument("--remat", default="none", choices=("none", "blocks", "convs"))
    parser.add_argument("--no-peer", action="store_true", help="do not time the PyTorch peer")
    parser.add_argument("--profile", action="store_true", help="XLA profile of the peer_unet step")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        peer_worker(args.batch_size)
        return
    default_cases = (PEER_CASE, "vp_digits") if args.quick else (PEER_CASE, *CONFIG_CASES)
    cases = args.cases.split(",") if args.cases else list(default_cases)
    unknown = sorted(set(cases) - {PEER_CASE, *CONFIG_CASES})
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {PEER_CASE}, {', '.join(CONFIG_CASES)}")
    timed_steps = args.steps or (2 if args.quick else 5)
    with_peer = PEER_CASE in cases and not args.no_peer and peer_available()

    output = {"machine": machine_info(), "quick": args.quick, "peaks": [], "records": []}
    peer = PeerSide(args.batch_size) if with_peer else None
    if peer is not None and peer.description["param_count"] != PEER_PARAMS:
        raise RuntimeError(f"the peer has {peer.description['param_count']} parameters")
    try:
        for dtype_name in args.dtypes.split(","):
            peaks = measure_peaks(dtype_name, args.quick)
            output["peaks"].append(peaks)
            for name in cases:
                case_peer = peer if name == PEER_CASE and dtype_name == "float32" else None
                record = run_case(name, args, peaks, case_peer, timed_steps)
                output["records"].append(record)
                print(json.dumps({"progress": record}), file=sys.stderr)  # survives a crash
    finally:
        if peer is not None:
            peer.close()
    if PEER_CASE in cases and not with_peer and not args.no_peer:
        output["peer_skipped"] = "torch / diffusers not installed (pip install -e '.[bench]')"
    output["machine"]["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()
