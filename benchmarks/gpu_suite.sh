#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one command (<= 9 minutes on an H100/H200):
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh            # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run                        # the same steps, tiny, on CPU
#
# 1. train step: bf16, batch 64, 2x224 + 8x96, the trainer's DeepSpeed step; the official DINO +
#    Container code beside it when OFFICIAL_DINO / OFFICIAL_CONTAINER name checkouts of them;
# 2. data pipeline: CPU workers, then data.augment_on=device (decode on CPU, crops on the GPU);
# 3. faiss-gpu k-NN at 1M x 512;
# 4. Imagenette-128 pretraining of Container-Light for a fixed number of minutes, k-NN at its end.
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
SHARDS="$DATA/imagenette/train-{000000..000009}.tar"

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
  step train_step 180 "$PY" benchmarks/train_step.py --device cuda --precision bf16 --batch 64 --global-size 224 \
    --n-local 8 --local-size 96 --steps 10 --warmup 3 --impl "$IMPLS" "${OFFICIAL[@]}"
  step data_cpu 60 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 20 --workers 12 --impl ours \
    --batch-size 64
  step data_device 60 "$PY" benchmarks/data_throughput.py --shards "$SHARDS" --seconds 20 --workers 12 --impl device \
    --device cuda --batch-size 64
  step knn 120 "$PY" benchmarks/knn.py --scales 1000000 --queries 10000 --dim 512 --threads 16
  step pretrain 300 "$PY" benchmarks/learning.py --config configs/imagenette.yaml --minutes 3 --evals 1 \
    --data "$DATA/imagenette" --resolution 128 --out "$OUT/pretrain" data.num_workers=12 engine.device=cuda schedule.warmup_epochs=1 \
    logging.tensorboard=false monitor.every_epochs=0
fi
echo "results: $OUT/suite.jsonl" | tee -a "$OUT/suite.log"
