#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md "Pending a GPU", in one call of under 9 minutes:
# overhead (CIFAR ResNet-56 batch 512, ResNet-50 batch 256), latency fidelity (ResNet-56), then the
# calibration step of the GPU Pareto (what each fixed strength learns on ResNet-20/56, one seed,
# six learning runs side by side on the one GPU). Timing stages run alone on the machine.
#   bash benchmarks/run_gpu_pending.sh OUTDIR [HARDWARE]     (HARDWARE: roofline entry, default H100)
set -u
dest=${1:?usage: run_gpu_pending.sh OUTDIR [HARDWARE]}
hardware=${2:-H100}
mkdir -p "$dest"
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/src:$root/benchmarks" PYTHONUNBUFFERED=1
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }  # seconds until the stage's deadline

nvidia-smi -L
python3 -c "import torch, torchvision, morphnet; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" || exit 1

echo "== overhead ($(date -u +%T))"
timeout "$(left 190)" python3 "$root/benchmarks/overhead.py" --device cuda --rounds 6 --steps 10 \
    --out "$dest/overhead_cuda.json" 2>&1 | tee "$dest/overhead.log"
echo "== latency fidelity ($(date -u +%T))"
timeout "$(left 400)" python3 "$root/benchmarks/latency_fidelity.py" --device cuda --hardware "$hardware" \
    --out "$dest/latency_fidelity_cuda.json" 2>&1 | tee "$dest/latency.log"
echo "== pareto gpu calibration ($(date -u +%T))"
budget=$(left 520)
for model in resnet20 resnet56; do
    for spec in gamma=15 gamma=30 logistic-sigmoid=3000; do
        name="pareto_gpu_calibration_${model}_${spec/=/_}"
        timeout "$budget" python3 "$root/benchmarks/pareto.py" --setting gpu --model "$model" --seeds 1 --learn-only \
            --skip-seed-network --strengths "$spec" --threads 2 --out "$dest/$name.json" > "$dest/$name.log" 2>&1 &
    done
done
wait
tail -n 3 "$dest"/pareto_gpu_calibration_*.log
echo "== done in $((SECONDS - start)) s ($(date -u +%T))"
