#!/usr/bin/env bash
# Training on one node: torchrun starts one training process per GPU.
#
# Usage: launch/torchrun_single_node.sh [--dry-run] [COMMAND] CONFIG [key.sub=value ...]
#   --dry-run   print the resolved command instead of running it
#   COMMAND     train (stage 1, the default), task-train or task-distill (stage 2)
# Environment:
#   NPROC       processes (GPUs) to start; default: every GPU nvidia-smi lists (1 without GPUs)
#   PYTHON      the Python of the environment with mtllm-train installed; default: python
# Example:
#   NPROC=8 launch/torchrun_single_node.sh configs/stage1_nllb600m_llm2vec_llama3_8b.yaml run.name=try1
# Rerunning the same command resumes from the newest complete checkpoint.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

parse_config_args "$0" "$@"
nproc=${NPROC:-$(local_gpus)}
preflight "$nproc"

run "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  -m mtllm_train "$COMMAND" --config "$CONFIG" "${OVERRIDES[@]}"
