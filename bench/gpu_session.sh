#!/usr/bin/env bash
# Issue 13's GPU measurements in one sitting on an H100 / H200 (device time is short): every line appends its
# table (micro-batch sweep, the real train.py loop, the 8xA100 / 8xH100 projection) to bench/RESULTS.md.
# Needs bitsandbytes (nf4) and torchao (fp8) importable: see ../shared/gpu-notes.md for bringing wheels.
#   bash bench/gpu_session.sh            # about 20 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
measure() { "$python" bench/gpu_throughput.py --max-batch 32 --write "$@"; }
measure --base bf16 --checkpointing none --compile
measure --base bf16 --checkpointing selective --compile
measure --base bf16 --checkpointing full --loop-steps 0
measure --base nf4 --checkpointing none --loop-steps 0
measure --base fp8 --checkpointing none --compile
measure --base fp8 --checkpointing selective --compile
