#!/usr/bin/env bash
# GPU benchmark of issue 7 on one H100/H200: Wan 1.3B, plain full fine-tuning vs FantasyWorld
# stage 1 / stage 2, gradient checkpointing on and off (an out-of-memory variant is recorded).
#   1. quick check: 240x416x81 video = 21x15x26 = 8,190 tokens (1 warm-up + 3 steps);
#   2. the table:   480x832x81 video = 21x30x52 = 32,760 tokens (2 warm-ups + 5 steps, profiled).
# Writes JSON + Markdown (+ a log, nvidia-smi, profiler tables) into $OUT (default outputs/bench/gpu).
# Runs from the repository root with the materialised diffsynth/ present. Time limits: 120 s + 240 s
# (a run cut short leaves <prefix>.partial.json with the variants done); expected about 3-4 minutes.
#
# On the device tool: carry ["diffsynth", ".whl"], timeout_s 480, command `bash bench/gpu_check.sh`.
# `import diffsynth` imports modelscope (diffsynth/core/loader/config.py) and ftfy
# (diffsynth/models/wan_video_text_encoder.py), which the GPU image lacks: their wheels travel in .whl/
# (see docs/benchmarks.md for how to fetch them). Without .whl/, inert stand-ins are used instead
# (the benchmark never downloads a model nor cleans a prompt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/bench/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-python3}"
EXTRA_PATH=""

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    EXTRA_PATH="/tmp/site"
  else
    echo "gpu_check: installing .whl/ failed; continuing (stand-ins below if diffsynth does not import)" >&2
  fi
fi
export PYTHONPATH=".${EXTRA_PATH:+:$EXTRA_PATH}${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import diffsynth.pipelines.wan_video" 2>"$OUT/import_error.txt"; then
  echo "gpu_check: 'import diffsynth.pipelines.wan_video' failed; trying inert stand-ins for modelscope/ftfy" >&2
  tail -3 "$OUT/import_error.txt" >&2
  mkdir -p /tmp/stubs/modelscope /tmp/stubs/ftfy
  printf 'def snapshot_download(*args, **kwargs):\n    raise RuntimeError("modelscope stand-in (bench/gpu_check.sh): no downloads")\n' \
    > /tmp/stubs/modelscope/__init__.py
  printf 'def fix_text(text, *args, **kwargs):\n    return text\n' > /tmp/stubs/ftfy/__init__.py
  export PYTHONPATH="$PYTHONPATH:/tmp/stubs"
  "$PY" -c "import diffsynth.pipelines.wan_video" || { echo "gpu_check: diffsynth does not import" >&2; exit 1; }
  echo "import used stand-ins for: modelscope ftfy" >> "$OUT/import_error.txt"
else
  rm -f "$OUT/import_error.txt"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
# 1. quick check at 8,190 tokens.
timeout 120 "$PY" bench/train_step.py --config 1.3B --height 240 --width 416 --num_frames 81 \
  --device cuda --warmup 1 --steps 3 --out "$OUT/train_step_1.3B_8190tok" 2>&1 | tee "$OUT/log.txt" || status=1
# 2. the table at 32,760 tokens (480x832x81), with one profiled step per variant (PROFILE=0: none).
PROFILE_ARGS=()
if [ "${PROFILE:-1}" != "0" ]; then PROFILE_ARGS=(--profile /tmp/bench_profile); fi
timeout 240 "$PY" bench/train_step.py --config 1.3B --height 480 --width 832 --num_frames 81 \
  --device cuda --warmup 2 --steps 5 ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"} \
  --out "$OUT/train_step_1.3B_32760tok" 2>&1 | tee -a "$OUT/log.txt" || status=1
if [ -d /tmp/bench_profile ]; then
  tar czf "$OUT/profiles_32760tok.tgz" -C /tmp bench_profile
fi
ls -la "$OUT"
exit $status
