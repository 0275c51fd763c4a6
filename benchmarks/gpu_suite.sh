#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one command (<= 10 minutes on an H100/H200):
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh            # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run                        # the same steps, tiny, on CPU
#
# On a machine without ../shared (an offline GPU node): make the data subset and the wheelhouse here,
# carry both, and point DATA at the subset:
#   python benchmarks/gpu_data.py --out .gpu_data/imagenette --train-shards 4 --val-shards 1   # ~38 MiB
#   python -m launch.wheelhouse --out .whl --python-version 3.12 --skip <what the node has>
#   DATA=.gpu_data OUT=... bash benchmarks/gpu_suite.sh
#
# 0. the gpu tests (pytest -m gpu): every ZeRO stage in bf16, a resume, the device multi-crop, export;
# 1. train step: bf16, batch 64, 2x224 + 8x96 and 2x128 + 8x64, the trainer's DeepSpeed step, eager and
#    with its blocks compiled, profiled (host share, kernels and syncs per step, model FLOPs utilisation);
#    the official DINO + Container code beside it when OFFICIAL_DINO / OFFICIAL_CONTAINER name checkouts;
# 2. data pipeline: CPU workers, then data.augment_on=device (decode on CPU, crops on the GPU);
# 3. Imagenette-128 pretraining of Container-Light for PRETRAIN_MINUTES (3), k-NN against the floors
#    (faiss when installed, else the exact torch search on the GPU).
#
# Each step has its own time limit and writes JSON lines to $OUT/suite.jsonl (tagged with the step's
# name under "bench") and its output to $OUT/suite.log; a step that fails or runs out of time is recorded as such
# and the suite goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu_suite}
DATA=${DATA:-../shared/data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
: > "$OUT/suite.jsonl"
: > "$OUT/suite.log"

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/suite.log"
  timeout "$limit" "$@" > "$OUT/$name.out" 2>> "$OUT/suite.log"
  local rc=$?
  cat "$OUT/$name.out" >> "$OUT/suite.log"
  # keep the JSON lines of the step, tagged with its name
  "$PY" - "$name" "$OUT/$name.out" "$rc" "$((SECONDS - t0))" >> "$OUT/suite.jsonl" <<'EOF'
import json, sys
name, path, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for line in open(path):
    line = line.strip()
    if line.startswith("{"):
        try:
            print(json.dumps({"bench": name, **json.loads(line)}))
        except json.JSONDecodeError:
            pass
print(json.dumps({"bench": name, "exit_code": rc, "timed_out": rc == 124, "seconds": secs}))
EOF
}

"$PY" - >> "$OUT/suite.jsonl" <<'EOF'
import json, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"bench": "machine", "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "host": platform.node(), "python": platform.python_version()}))
EOF

OFFICIAL=()
IMPLS=deepspeed
if [ -n "${OFFICIAL_DINO:-}" ] && [ -n "${OFFICIAL_CONTAINER:-}" ]; then
  OFFICIAL=(--official-dino "$OFFICIAL_DINO" --official-container "$OFFICIAL_CONTAINER")
  IMPLS=deepspeed,official
fi
# The training shards named by the data folder's own dataset.json (the full set, or a subset from benchmarks/gpu_data.py).
SHARDS="$DATA/imagenette/$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['splits']['train']['shards'])" \
  "$DATA/imagenette/dataset.json" 2>/dev/null || echo 'train-{000000..000009}.tar')"

if [ "$DRY" = 1 ]; then
  step train_step 240 "$PY" benchmarks/train_step.py --device cpu --precision fp32 --batch 2 --global-size 64 \
    --n-local 2 --local-size 32 --steps 1 --warmup 0 --impl "$IMPLS" "${OFFICIAL[@]}"
  step data_cpu 120 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 3 --workers 1 --impl ours \
    --batch-size 8 --global-size 64 --local-size 32 --n-local 2
  step data_device 120 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 3 --workers 1 --impl device \
    --device cpu --batch-size 8 --global-size 64 --local-size 32 --n-local 2
  step knn 240 "$PY" benchmarks/knn.py --scales 20000 --queries 500 --dim 64
  step pretrain 400 "$PY" benchmarks/learning.py --config configs/small_budget.yaml --steps 4 --evals 1 \
    --data "$DATA/imagenette" --max-shards 1 --out "$OUT/pretrain" data.num_workers=1 max_steps=4
else
  # What the product runs on a GPU, tests first; each step is bounded. ONLY=a,b runs those steps alone.
  step gpu_tests 170 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  B=(--device cuda --precision bf16 --batch 64 --steps 8 --warmup 2 --zero-stage 1)
  step step224 70 "$PY" benchmarks/train_step.py "${B[@]}" --global-size 224 --n-local 8 --local-size 96 \
    --impl "$IMPLS" --profile "${OFFICIAL[@]}"
  step step224_compile 160 "$PY" benchmarks/train_step.py "${B[@]}" --global-size 224 --n-local 8 --local-size 96 \
    --impl deepspeed --compile --profile
  step step128 60 "$PY" benchmarks/train_step.py "${B[@]}" --global-size 128 --n-local 8 --local-size 64 \
    --impl deepspeed --profile
  step step128_compile 130 "$PY" benchmarks/train_step.py "${B[@]}" --global-size 128 --n-local 8 --local-size 64 \
    --impl deepspeed --compile --profile
  step data_cpu 35 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 12 --workers 14 --impl ours \
    --batch-size 64 --global-size 128 --local-size 64
  step data_device 35 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 12 --workers 14 --impl device \
    --device cuda --batch-size 64 --global-size 128 --local-size 64
  step pretrain $((${PRETRAIN_SECONDS:-150} + 90)) "$PY" benchmarks/learning.py --config configs/imagenette.yaml \
    --minutes "$("$PY" -c "print(${PRETRAIN_SECONDS:-150} / 60)")" --evals 2 --data "$DATA/imagenette" --resolution 128 \
    --out "$OUT/pretrain" "data.urls=[$SHARDS]" data.num_workers=14 engine.device=cuda schedule.warmup_epochs=2 \
    logging.tensorboard=false monitor.every_epochs=0 ${PRETRAIN_OVERRIDES:-}
fi
echo "results: $OUT/suite.jsonl" | tee -a "$OUT/suite.log"
