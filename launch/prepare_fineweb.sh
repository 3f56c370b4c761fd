#!/usr/bin/env bash
# Build stage-1 shards from FineWeb parquet files (e.g. sample/10BT), tokenized in parallel worker processes.
#
# Usage: launch/prepare_fineweb.sh [--dry-run] PARQUET_DIR OUT_DIR LLM_TOKENIZER MT_TOKENIZER
#   --dry-run   print the resolved command instead of running it
# Environment:
#   WORKERS      tokenizer processes; default: all cores
#   MAX_LENGTH   tokens per view; default 512
#   SHARD_SIZE   documents per shard; default 10000
#   MT_LANG      language code of the MT view; default eng_Latn
#   PYTHON       the Python of the environment with mtllm-train installed; default: python
# Example:
#   launch/prepare_fineweb.sh data/fineweb/sample/10BT shards/build/fineweb-nllb-llama3 \
#     models/llm2vec-llama3-8b facebook/nllb-200-distilled-600M
# An interrupted build resumes when the same command is run again.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -ne 4 ]]; then usage "$0"; exit 2; fi
parquet_dir=$1 out_dir=$2 llm_tokenizer=$3 mt_tokenizer=$4
shopt -s nullglob
files=("$parquet_dir"/*.parquet)
if ((${#files[@]} == 0)); then
  echo "no .parquet files in '$parquet_dir'" >&2
  exit 2
fi

run "${PYTHON:-python}" -m mtllm_train shards build --input "${files[@]}" --out "$out_dir" \
  --llm-tokenizer "$llm_tokenizer" --mt-tokenizer "$mt_tokenizer" --mt-lang "${MT_LANG:-eng_Latn}" \
  --max-length "${MAX_LENGTH:-512}" --shard-size "${SHARD_SIZE:-10000}" --workers "${WORKERS:-$(nproc)}"
