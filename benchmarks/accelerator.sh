#!/usr/bin/env bash
# Throughput, memory and a 2,000-step vp_mnist-sized training run on whatever device JAX finds,
# merged into one JSON file.
#
#   benchmarks/accelerator.sh [--small] [OUTPUT.json]      (from anywhere; default OUTPUT:
#                                                           benchmarks/results/accelerator.json)
#
# Full run (an accelerator; planned to fit in 8 minutes on one GPU):
#   * benchmarks.train_throughput: peer_unet, vp_mnist, vp_cifar10 at batch 128, float32 and
#     bfloat16 compute, 5 timed steps each, against the peaks measured in the same run (and the
#     PyTorch peer for peer_unet when torch and diffusers are installed);
#   * benchmarks.memory: vp_mnist training at batch 128 (plain, remat='blocks', bfloat16) and
#     1,000 samples in 20 DPM-Solver++(2M) steps; on an accelerator device_peak_bytes is the figure;
#   * benchmarks.training_run: 2,000 steps of vp_mnist's network, loss and optimiser at batch 128.
# --small: the same three programs at a size a 2-core CPU runs in a few minutes (vp_digits, 20
#   training steps), to check the script itself.
set -euo pipefail

small=0
output=""
for argument in "$@"; do
  case "$argument" in
    --small) small=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $argument" >&2; exit 2 ;;
    *) output="$argument" ;;
  esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
output="$(realpath -m "${output:-$root/benchmarks/results/accelerator.json}")"
cd "$root"
python="${PYTHON:-python}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

if ((small)); then
  throughput_args=(--quick --cases=vp_digits --steps=1 --no-peer)
  memory_args=(--quick --config=vp_digits --num-samples=64)
  run_args=(--config=vp_digits --steps=20)
else
  throughput_args=(--cases=peer_unet,vp_mnist,vp_cifar10 --dtypes=float32,bfloat16 --steps=5)
  memory_args=(--cases=train,train_remat_blocks,train_bfloat16,sample)
  run_args=(--config=vp_mnist --steps=2000)
fi

start=$SECONDS
echo "throughput: ${throughput_args[*]}" >&2
"$python" -m benchmarks.train_throughput "${throughput_args[@]}" > "$scratch/throughput.json"
echo "memory: ${memory_args[*]}" >&2
"$python" -m benchmarks.memory "${memory_args[@]}" > "$scratch/memory.json"
echo "training run: ${run_args[*]}" >&2
"$python" -m benchmarks.training_run "${run_args[@]}" > "$scratch/training_run.json"
elapsed=$((SECONDS - start))

mkdir -p "$(dirname "$output")"
"$python" - "$scratch" "$output" "$small" "$elapsed" <<'PYTHON'
import json
import sys

scratch, output, small, elapsed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
merged = {"small": small, "seconds": elapsed}
for part in ("throughput", "memory", "training_run"):
    with open(f"{scratch}/{part}.json") as file:
        merged[part] = json.load(file)
with open(output, "w") as file:
    json.dump(merged, file, indent=1)
print(f"wrote {output} ({elapsed} s)")
PYTHON
