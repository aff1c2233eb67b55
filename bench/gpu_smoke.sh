#!/usr/bin/env bash
# The first run on a GPU machine: every code path that a CPU cannot prove, in a few minutes.
#
#   bash bench/gpu_smoke.sh                 # DEVICE=cuda when a GPU is visible, else cpu
#   DEVICE=cpu bash bench/gpu_smoke.sh      # the same steps on the CPU (under 10 minutes on 2 cores)
#   DEVICE=cuda:1 OUT=/tmp/smoke bash bench/gpu_smoke.sh
#
# Steps (each prints a line starting with "== "; the script stops at the first failure, exit status 1):
#   a. pretrain the demo MSBReg for 2 steps in bf16 and in fp16, interrupted after step 1 and resumed; the
#      resumed backbone is compared with an uninterrupted run's (bit-equal on the CPU; on a GPU the
#      largest difference is printed: cuDNN's kernels are not bit-reproducible across runs)
#   b. every task of `--task all --demo` on DEVICE (random ResNet-50), plus kNN with bank_dtype=float16
#      and with protocol=wmse
#   c. the same kNN and linear tasks on the CPU, and the metric differences (tolerance below)
#   d. both detection engines (torchvision, Detectron2 when it imports) for 4 iterations on DEVICE
#   e. images/s of extraction and pretraining on DEVICE beside the CPU (bench/throughput.py); a probe's loader
#      rebuilt every epoch beside the suite's one loader (bench/loaders.py); a probe reading its loss every
#      step beside EpochTotals, with syncs per step on CUDA, and the pretraining loop's host reads
#      (bench/host_syncs.py)
#   f. with 2 or more GPUs: torchrun with 2 processes for pretraining, extraction (kNN, linear) and
#      torchvision detection; the evaluation records are compared with the one-process ones; the Detectron2
#      engine under torchrun and launched by plain python on every GPU (run, not compared: its sampling is
#      drawn per process)
#
# Tolerance of (c) and (f): 0 when both sides run float32 on the CPU. On a GPU, features are extracted in
# bfloat16/float16 (backbones.features.autocast_dtype), whose 8-11 mantissa bits move a demo metric by a
# few test images at most: TOL points (default 2.0 = 2% of the demo test set, a handful of near-tied
# neighbours or decision boundaries); a real bug (a wrong device, a wrong token, unnormalised features)
# moves it by tens of points.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-$(mktemp -d)/gpu_smoke}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ -z "${DEVICE:-}" ]; then DEVICE=$([ "$NGPU" -gt 0 ] && echo cuda || echo cpu); fi
TOL=${TOL:-$([ "$DEVICE" = cpu ] && echo 0 || echo 2.0)}
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "== $* ($(( $(date +%s) - START )) s)"; }
run() { echo "+ $*" >> "$OUT/commands.txt"; "$@"; }
say "device $DEVICE, $NGPU GPU(s), output $OUT, tolerance $TOL"

# a. pretraining: bf16 and fp16, interrupted and resumed, against an uninterrupted run
PRE="--config demo device=$DEVICE max_steps=2 warmup_epochs=0 save_every_steps=1 log_every_steps=1 workers=2"
for AMP in bf16 fp16; do
  say "a. pretraining amp=$AMP: 2 steps uninterrupted, then 1 step + --resume"
  run $PY pretrain/train.py $PRE amp=$AMP out_dir="$OUT/pre_$AMP/full"
  run $PY pretrain/train.py $PRE amp=$AMP out_dir="$OUT/pre_$AMP/resumed" stop_after_steps=1
  run $PY pretrain/train.py $PRE amp=$AMP out_dir="$OUT/pre_$AMP/resumed" --resume
  $PY - "$OUT/pre_$AMP" "$DEVICE" <<'EOF'
import sys, torch
root, device = sys.argv[1], sys.argv[2]
a = torch.load(f"{root}/full/backbone.pth", map_location="cpu", weights_only=True)
b = torch.load(f"{root}/resumed/backbone.pth", map_location="cpu", weights_only=True)
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"   resumed vs uninterrupted backbone: largest difference {worst:.3g} over {len(a)} tensors")
if device == "cpu" and worst != 0.0:
    sys.exit("   a resumed CPU run must equal the uninterrupted one bit for bit")
EOF
done

# b. every demo task on DEVICE, plus kNN's half-precision bank and W-MSE protocol
EVAL="--ckpt random --arch resnet50 --demo"  # ResNet-50: Detectron2's C4 head needs a bottleneck res5
say "b. --task all --demo on $DEVICE"
run $PY evaluate/run.py $EVAL --task all --device "$DEVICE" --out "$OUT/dev_all"
say "b. kNN with bank_dtype=float16 and protocol=wmse on $DEVICE"
run $PY evaluate/run.py $EVAL --task knn_stl10 --device "$DEVICE" --set bank_dtype=float16 --out "$OUT/dev_knn16"
run $PY evaluate/run.py $EVAL --task knn_stl10 --device "$DEVICE" --set protocol=wmse --out "$OUT/dev_knnwmse"

# c. the same frozen-feature tasks on the CPU, side by side
say "c. kNN and linear on the CPU beside $DEVICE (tolerance $TOL points)"
run $PY evaluate/run.py $EVAL --task knn_stl10,linear_stl10 --device "$DEVICE" --out "$OUT/dev_frozen"
run $PY evaluate/run.py $EVAL --task knn_stl10,linear_stl10 --device cpu --out "$OUT/cpu_frozen"
run $PY bench/compare_records.py "$OUT/cpu_frozen" "$OUT/dev_frozen" --tol "$TOL"

# d. both detection engines, a few iterations
DET="--set max_iter=4 --set steps=2,3 --set warmup_iters=1 --set precise_bn_iters=2 --set checkpoint_period=2"
ENGINES=torchvision
if $PY -c "import detectron2" 2>/dev/null; then ENGINES="torchvision detectron2"; else
  say "d. Detectron2 does not import: its engine is skipped (README: Detection)"; fi
for ENGINE in $ENGINES; do
  say "d. voc_det with engine=$ENGINE, 4 iterations on $DEVICE"
  run $PY evaluate/run.py $EVAL --task voc_det --device "$DEVICE" --set engine=$ENGINE $DET --out "$OUT/det_$ENGINE"
done

# e. speed beside the CPU
say "e. images/s on $DEVICE beside the CPU"
QUICK=$([ "$DEVICE" = cpu ] && echo --quick || true)
run $PY bench/throughput.py --device "$DEVICE" $QUICK
say "e. loaders rebuilt every epoch beside one loader, on $DEVICE"
QUICK_LOADERS=$([ -n "$QUICK" ] && echo "--repeats 2" || true)
QUICK_SYNCS=$([ -n "$QUICK" ] && echo "--steps 5 --repeats 2" || true)
run $PY bench/loaders.py --device "$DEVICE" $QUICK_LOADERS
say "e. host reads every step beside once per epoch, on $DEVICE"
run $PY bench/host_syncs.py --device "$DEVICE" $QUICK_SYNCS

# f. torchrun paths (two GPUs or more)
if [ "$NGPU" -ge 2 ] && [ "$DEVICE" != cpu ]; then
  TR="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
  say "f. torchrun pretraining (2 processes, sync_bn) and --resume"
  run $TR pretrain/train.py $PRE out_dir="$OUT/pre_ddp" stop_after_steps=1
  run $TR pretrain/train.py $PRE out_dir="$OUT/pre_ddp" --resume
  say "f. torchrun kNN and linear beside one process"
  run $TR evaluate/run.py $EVAL --task knn_stl10,linear_stl10 --device cuda --out "$OUT/ddp_frozen"
  run $PY bench/compare_records.py "$OUT/dev_frozen" "$OUT/ddp_frozen" --tol "$TOL"
  say "f. torchrun detection (torchvision engine) beside one process"
  run $TR evaluate/run.py $EVAL --task voc_det --device cuda --set engine=torchvision $DET --out "$OUT/ddp_det"
  run $PY bench/compare_records.py "$OUT/det_torchvision" "$OUT/ddp_det" --tol "$TOL"
  if [[ " $ENGINES " == *" detectron2 "* ]]; then
    # Detectron2's RPN / RoI sampling draws per process, so its records are not compared with one process
    say "f. Detectron2 engine under torchrun (2 processes, SyncBN), and launched by plain python on every GPU"
    run $TR evaluate/run.py $EVAL --task voc_det --device cuda --set engine=detectron2 $DET --out "$OUT/ddp_det2"
    run $PY evaluate/run.py $EVAL --task voc_det --device cuda --set engine=detectron2 $DET --out "$OUT/launch_det2"
  fi
else
  say "f. torchrun paths skipped: they need 2 GPUs ($NGPU visible)"
fi
say "passed; records under $OUT, commands in $OUT/commands.txt"
