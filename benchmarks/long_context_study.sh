#!/usr/bin/env bash
# The GPU study behind docs/results/long_context.md: SmolLM2-135M-Instruct converted to MLA (256 + 64) and healed
# (benchmarks/conversion_study.sh), then extended with YaRN x16 and trained on long needle data with Torchtune's own
# FSDP recipes (SFT at up to 32k tokens, SFT at 48k-64k, then DPO), next to its GQA control trained the same way;
# then passkey from 4k to 128k tokens.
# Each stage is a `tune run` of a shipped config; a stage whose output exists is skipped, so the study resumes.
#
#   benchmarks/long_context_study.sh prepare|sft|sft64k|dpo|heldout|anchors|landmark|chat|multi|million|delta|extract|rebuild|base GGUF RESULTS_DIR
#   (evaluate = heldout + anchors + landmark + chat + multi, in order; million = the 1M-token run; delta = the MLA
#   model after DPO as a <= 20 MB delta over the CPU conversion a user rebuilds, and its passkey beside the model's;
#   extract = any tuned model, TUNED=dir, as a delta OUTPUT=file over BASE: mla (the CPU conversion, default) or
#   origin (the GQA origin, for the control); rebuild = an earlier session's model from its delta, DELTA=file, over
#   BASE into REBUILT (default the 64k stage's MLA model as mla_sft64k_delta), with the origin's directory the later
#   stages read the tokenizer from; base = the CPU conversion every MLA delta is made over, alone, e.g. beside the
#   training)
#
# A 135M model leaves an H200 mostly idle, so the trained pairs (sft, dpo) train side by side, and the evaluation
# stages can run as separate processes at once (each writes its own directory; TAG suffixes it, so one stage can be
# split by MODEL_NAMES and merged afterwards with `python -m mla_components.evaluation.report merge`; a stage cut by a
# time limit leaves its journal, reported by `... report journal`).
#
# CONFIGS (default configs/smollm2_135m) points at other copies of the configs (the CPU test shrinks them);
# SFT_ARGS / DPO_ARGS / EVAL_ARGS add command-line overrides; MODELS limits the trained pairs (default "mla gqa");
# MODEL_NAMES limits the passkey stages' models, e.g. MODEL_NAMES=mla_dpo,gqa_dpo (default: per stage, below);
# TRIALS sets trials per cell (default 4 up to 128k, 1 at 1M); YARN_FACTOR (default: the configs' 16) sets the YaRN
# factor of the trained models in every stage that trains or evaluates them (the untrained anchors keep theirs).
set -euo pipefail
stage=$1 gguf=$2 results=$3
configs=${CONFIGS:-configs/smollm2_135m}
work=outputs/smollm2_135m
tune=(python3 -m torchtune._cli.tune run)
mkdir -p "$results"
stamp() { echo "[$(date +%T)] $*"; }
read -r -a sft_args <<< "${SFT_ARGS:-}"
read -r -a dpo_args <<< "${DPO_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
yarn_eval=()
if [ -n "${YARN_FACTOR:-}" ]; then
  sft_args+=("yarn.factor=$YARN_FACTOR")
  dpo_args+=("yarn.factor=$YARN_FACTOR")
  yarn_eval=("yarn_mla.factor=$YARN_FACTOR" "yarn_gqa.factor=$YARN_FACTOR")
fi

# One training stage of one model: skip when its final epoch exists, resume from an intermediate one.
train() {
  local recipe=$1 config=$2 out=$3 log=$4
  shift 4
  if [ -f "$out/epoch_0/config.json" ] && [ ! -f "$out/epoch_0/recipe_state.pt" ]; then
    stamp "skip $config (done)"
  else
    stamp "$recipe $config"
    "${tune[@]}" --nproc_per_node 1 "$recipe" --config "$configs/$config" "$@"
  fi
  cp "$out"/logs/log_*.txt "$results/$log" 2>/dev/null || true
}

# One passkey run of passkey_long_compare.yaml: models (comma-separated names, empty = all), output dir, overrides.
# UNTRAINED=1: models whose YaRN factor YARN_FACTOR does not set.
passkey() {
  local names=$1 out=$2
  shift 2
  local select=() yarn=("${yarn_eval[@]}")
  [ -n "$names" ] && select=("model_names=[$names]")
  [ -n "${UNTRAINED:-}" ] && yarn=()
  "${tune[@]}" mla_recipes/passkey_eval.py --config "$configs/passkey_long_compare.yaml" output_dir="$out${TAG:+_$TAG}" \
    "${select[@]}" "$@" "${yarn[@]}" "${eval_args[@]}"
}

# Train every model of MODELS with one recipe at the same time (one process each); fail if any of them failed.
train_all() {
  local recipe=$1 stage=$2 status=0
  shift 2
  local pids=()
  for m in ${MODELS:-mla gqa}; do
    train "$recipe" "long_${stage}_$m.yaml" "$work/long_${stage}_$m" "long_${stage}_${m}_log.txt" "$@" \
      > "$results/long_${stage}_${m}_stdout.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tail -n 3 "$results"/long_"${stage}"_*_stdout.txt
  return $status
}

case $stage in
  prepare | sft | sft64k | dpo | heldout | anchors | landmark | chat | multi | million | delta | extract | rebuild | base | evaluate) ;;
  *)
    echo "usage: $0 prepare|sft|sft64k|dpo|heldout|anchors|landmark|chat|multi|million|delta|extract|rebuild|base|evaluate GGUF RESULTS_DIR" >&2
    exit 2
    ;;
esac
# The base every delta is made over: the conversion as a user reruns it, on a CPU, calibrated on the token windows that
# ship beside the deltas (the corpus comes with Python and differs between versions, so a user's Python could not
# reproduce windows drawn elsewhere). The tuned model need not descend from this base: the delta is their difference.
convert=(mla_recipes/convert_to_mla.py --config configs/smollm2_135m/convert_mla_256.yaml device=cpu
  calibration.tokens_file=docs/results/long_context/mla_256_calibration_tokens.safetensors)
base_recipe="tune run ${convert[*]} output_dir=outputs/smollm2_135m/mla_256_cpu"
# the GQA control's base: the origin as that same command writes it (the GGUF dequantised, no calibration involved)
origin_recipe="$base_recipe origin_output_dir=outputs/smollm2_135m/origin"
cpu_base() {  # ORIGIN_DIR: where the origin's HF directory goes (null: not written)
  [ -f "$work/mla_256_cpu/model/config.json" ] && { [ "$1" = null ] || [ -f "$1/config.json" ]; } && return 0
  "${tune[@]}" "${convert[@]}" origin.source="$gguf" output_dir="$work/mla_256_cpu" origin_output_dir="$1" \
    > "$results/base_conversion.txt" 2>&1
}

# BASE (mla or origin) -> the base's directory and the command that rebuilds it
base_of() {
  case ${BASE:-mla} in
    mla) base_dir=$work/mla_256_cpu/model recipe=$base_recipe ;;
    origin) base_dir=$work/origin recipe=$origin_recipe ;;
    *)
      echo "BASE=$BASE: use mla (the CPU conversion) or origin (the GQA origin)" >&2
      exit 2
      ;;
  esac
}
extract() {  # extract TUNED OUTPUT: TUNED as a delta over base_dir, its report beside OUTPUT
  python3 -m mla_components.checkpointing.delta extract --base "$base_dir" --tuned "$1" --output "$2" \
    --max-mb "${DELTA_MB:-20}" --device "${DEVICE:-cuda}" --base-recipe "$recipe" | tee "${2%.safetensors}_report.json"
}

# `evaluate` runs the four evaluation stages in order
runs() { [ "$stage" = "$1" ] || { [ "$stage" = evaluate ] && [[ " heldout anchors landmark chat multi " == *" $1 "* ]]; }; }

if runs prepare; then  # the healed 256 + 64 conversion (and the origin's HF directory) the training starts from
  CONVERT_RANKS=256 benchmarks/conversion_study.sh convert "$gguf" "$results"
  benchmarks/conversion_study.sh heal "$gguf" "$results"
fi
if runs sft; then
  train_all full_finetune_distributed sft "${sft_args[@]}"
fi
if runs sft64k; then  # the second SFT stage, real 48k-64k sequences, from the first one's checkpoints
  train_all full_finetune_distributed sft64k "${sft_args[@]}"
fi
if runs dpo; then
  train_all full_dpo_distributed dpo "${dpo_args[@]}"
fi
if runs heldout; then
  stamp "held-out perplexity and KL vs the origin (short text: long-context training must not break the model)"
  checkpoints=()  # the models this session has
  for pair in mla_healed=heal_mla_256/epoch_1 mla_sft=long_sft_mla/epoch_0 mla_sft64k=long_sft64k_mla/epoch_0 \
    mla_sft64k_delta=long_sft64k_mla_delta mla_dpo=long_dpo_mla/epoch_0 mla_dpo_delta=long_dpo_mla_delta \
    gqa_sft=long_sft_gqa/epoch_0 gqa_sft64k=long_sft64k_gqa/epoch_0 gqa_dpo=long_dpo_gqa/epoch_0; do
    [ -f "$work/${pair#*=}/config.json" ] && checkpoints+=(--checkpoint "${pair%%=*}=$work/${pair#*=}")
  done
  python3 -m mla_components.conversion.pipeline --origin "$work/origin" --device "${DEVICE:-cuda}" --sequences 16 \
    --seq-len 1024 "${checkpoints[@]}" > "$results/heldout.json"
fi
if runs anchors; then
  stamp "passkey, standard Landmark prompt: the untrained models (origin, origin + YaRN x16, healed MLA)"
  UNTRAINED=1 passkey "${MODEL_NAMES:-origin,origin_yarn16,mla_healed}" "$results/passkey_anchors" prompt_format=landmark \
    trials_per_cell="${TRIALS:-4}"
fi
if runs landmark; then
  stamp "passkey, standard Landmark prompt (evaluation-only): the trained models"
  passkey "${MODEL_NAMES:-mla_dpo,gqa_dpo}" "$results/passkey_landmark" prompt_format=landmark \
    trials_per_cell="${TRIALS:-4}"
fi
if runs chat; then
  stamp "passkey, the project's eval-split templates in the chat format, trained models"
  passkey "${MODEL_NAMES:-mla_sft,mla_dpo,gqa_sft,gqa_dpo}" "$results/passkey_chat" trials_per_cell="${TRIALS:-2}"
fi
if runs multi; then
  stamp "multi-needle (a question about one of 3-4 planted values): SFT vs DPO distractor answers"
  passkey "${MODEL_NAMES:-mla_sft,mla_dpo,gqa_sft,gqa_dpo}" "$results/passkey_multi" needle_kind=multi \
    trials_per_cell="${TRIALS:-2}" "context_lengths=[4096,16384,32768]"
fi
if runs million; then
  stamp "passkey at 1M tokens, standard Landmark prompt: chunked prefill into the cache, decode through the kernel"
  passkey "${MODEL_NAMES:-mla_dpo}" "$results/passkey_1m" prompt_format=landmark trials_per_cell="${TRIALS:-1}" \
    model_max_seq_len=1048700 "context_lengths=[1048576]" prefill_chunk=32768
fi
if runs delta; then
  stamp "compact delta: the MLA model after DPO over the CPU rerun of the conversion"
  cpu_base null
  BASE=mla base_of
  extract "$work/long_dpo_mla/epoch_0" "$results/mla_dpo_delta.safetensors"
  python3 -m mla_components.checkpointing.delta apply --base "$work/mla_256_cpu/model" \
    --delta "$results/mla_dpo_delta.safetensors" --output "$work/long_dpo_mla_delta"
  passkey "${MODEL_NAMES:-mla_dpo,mla_dpo_delta}" "$results/passkey_delta" prompt_format=landmark \
    trials_per_cell="${TRIALS:-2}" "context_lengths=[4096,16384,32768]"
fi
if runs extract; then
  base_of
  stamp "compact delta: ${TUNED:?extract needs TUNED=<a tuned checkpoint directory>} over $base_dir"
  if [ "${BASE:-mla}" = mla ]; then
    cpu_base null
  elif [ ! -f "$work/origin/config.json" ]; then
    cpu_base "$work/origin"
  fi
  extract "$TUNED" "${OUTPUT:?extract needs OUTPUT=<a .safetensors file>}"
fi
if runs base; then
  cpu_base null
fi
if runs rebuild; then
  base_of
  rebuilt=${REBUILT:-$work/long_sft64k_mla_delta}
  stamp "rebuild ${DELTA:?rebuild needs DELTA=<a delta file>} into $rebuilt: the conversion it names, then the delta"
  origin_dir=null
  [ -f "$work/origin/config.json" ] || origin_dir=$work/origin
  cpu_base "$origin_dir"
  python3 -m mla_components.checkpointing.delta apply --base "$base_dir" --delta "$DELTA" --output "$rebuilt"
fi
stamp "done: $stage"
