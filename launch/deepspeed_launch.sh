#!/usr/bin/env bash
# Training with the DeepSpeed launcher (ZeRO-2 or ZeRO-3), on this node or on the nodes of a hostfile.
#
# Usage: launch/deepspeed_launch.sh [--dry-run] [COMMAND] CONFIG [key.sub=value ...]
#   --dry-run   print the resolved command instead of running it
#   COMMAND     train (stage 1, the default), task-train or task-distill (stage 2)
# Environment:
#   ZERO        2 or 3: the ZeRO stage, with configs/deepspeed/zero$ZERO.json (bf16, for GPUs); default 2
#   HOSTFILE    a DeepSpeed hostfile (see launch/hostfile.example); unset: this node only
#   NUM_GPUS    GPUs per node; default: all
#   NODE_RANK   without ssh (DeepSpeed's --no_ssh): run this script on every node of the hostfile, each with its
#               own NODE_RANK (0 ... nodes-1) and MASTER_ADDR, the first node's address
#   MASTER_ADDR, MASTER_PORT   the first node's address and a free port on it (default port 29500)
# Example:
#   HOSTFILE=launch/hostfile ZERO=3 launch/deepspeed_launch.sh configs/stage1_nllb600m_gpt2_medium.yaml
# On CPU (tested so: see README), the override distributed.deepspeed_config= drops the bf16 json:
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=127.0.0.1 launch/deepspeed_launch.sh configs/tiny.yaml \
#     distributed.deepspeed_config=
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
for override in "${OVERRIDES[@]}"; do
  if [[ $override == distributed.zero_stage=* ]]; then  # the json below would win over it, silently
    echo "$override: the ZeRO stage comes from ZERO=2|3 here (with its configs/deepspeed json)" >&2
    exit 2
  fi
done
# The json by absolute path: overrides are read against the current folder, which need not be the repository.
deepspeed_json="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/deepspeed/zero$zero.json"
# The processes DeepSpeed will start: the hostfile's slots, else NUM_GPUS (or this node's GPUs) on one node.
world_size=${NUM_GPUS:-$(local_gpus)}
if [[ -n ${HOSTFILE:-} ]]; then
  world_size=$(grep -o 'slots=[0-9]*' "$HOSTFILE" | awk -F= '{total += $2} END {print total + 0}')
fi
preflight "$world_size" distributed.backend=deepspeed "distributed.zero_stage=$zero" \
  "distributed.deepspeed_config=$deepspeed_json"

# --no_local_rank: DeepSpeed would put --local_rank=N before the command; the ranks read LOCAL_RANK instead.
launcher=(deepspeed --no_local_rank)
if [[ -n ${HOSTFILE:-} ]]; then launcher+=(--hostfile "$HOSTFILE"); fi
if [[ -n ${NUM_GPUS:-} ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n ${MASTER_ADDR:-} ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n ${MASTER_PORT:-} ]]; then launcher+=(--master_port "$MASTER_PORT"); fi
if [[ -n ${NODE_RANK:-} ]]; then
  # Without it DeepSpeed asks the first node for its address over ssh.
  : "${MASTER_ADDR:?NODE_RANK (no ssh) needs MASTER_ADDR, the address of node 0}"
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
run "${launcher[@]}" --module mtllm_train "$COMMAND" --config "$CONFIG" distributed.backend=deepspeed \
  "distributed.zero_stage=$zero" "distributed.deepspeed_config=$deepspeed_json" "${OVERRIDES[@]}"
