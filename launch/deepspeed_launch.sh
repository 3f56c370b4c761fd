#!/usr/bin/env bash
# Training with the DeepSpeed launcher (ZeRO-2 or ZeRO-3), on this node or on the nodes of a hostfile.
#
# Usage: launch/deepspeed_launch.sh [--dry-run] [COMMAND] CONFIG [key.sub=value ...]
#   --dry-run   print the resolved command instead of running it
#   COMMAND     train (stage 1, the default), task-train or task-distill (stage 2)
# Environment:
#   ZERO        2 or 3: uses configs/deepspeed/zero$ZERO.json; default 2
#   HOSTFILE    a DeepSpeed hostfile (see launch/hostfile.example); unset: this node only
#   NUM_GPUS    GPUs per node; default: all
# Example:
#   HOSTFILE=launch/hostfile ZERO=3 launch/deepspeed_launch.sh configs/stage1_nllb600m_gpt2_medium.yaml
# The 8-bit optimizer and 4-bit base are the ddp / fsdp path; with DeepSpeed use optim.name=adamw and
# model.quantization=none if your DeepSpeed build refuses them.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

parse_config_args "$0" "$@"
zero=${ZERO:-2}
if [[ $zero != 2 && $zero != 3 ]]; then
  echo "ZERO must be 2 or 3, got '$zero'" >&2
  exit 2
fi

launcher=(deepspeed)
if [[ -n ${HOSTFILE:-} ]]; then launcher+=(--hostfile "$HOSTFILE"); fi
if [[ -n ${NUM_GPUS:-} ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
run "${launcher[@]}" --module mtllm_train "$COMMAND" --config "$CONFIG" distributed.backend=deepspeed \
  "distributed.deepspeed_config=configs/deepspeed/zero$zero.json" "${OVERRIDES[@]}"
