#!/usr/bin/env bash
# The GPU study behind docs/results/conversion.md: SmolLM2-135M-Instruct converted to MLA (latent 512 + rope 64
# and 256 + 64), the 256 + 64 conversion healed by distillation from the origin, then held-out perplexity / KL
# and passkey accuracy at 1k-4k, origin and MLA side by side. Each stage is a `tune run` of a shipped config;
# a stage whose output exists is skipped, so the study resumes after an interrupted call.
#
#   benchmarks/conversion_study.sh convert|heal|evaluate GGUF RESULTS_DIR
#
# Work files go to outputs/smollm2_135m (the configs' defaults); RESULTS_DIR gets the reports.
set -euo pipefail
stage=$1 gguf=$2 results=$3
work=outputs/smollm2_135m
tune=(python3 -m torchtune._cli.tune run)
mkdir -p "$results"
stamp() { echo "[$(date +%T)] $*"; }

if [ "$stage" = convert ]; then
  for rank in ${CONVERT_RANKS:-512 256}; do
    if [ ! -f "$work/mla_$rank/conversion_report.json" ]; then
      stamp "convert $rank"
      "${tune[@]}" mla_recipes/convert_to_mla.py --config configs/smollm2_135m/convert_mla_$rank.yaml \
        origin.source="$gguf" device=cuda calibration.sequences=64 heldout.sequences=16 heldout.seq_len=1024
    fi
    cp "$work/mla_$rank/conversion_report.json" "$results/conversion_report_$rank.json"
  done
fi

if [ "$stage" = heal ]; then
  for rank in ${HEAL_RANKS:-256}; do
    if [ ! -f "$work/heal_mla_$rank/epoch_1/config.json" ]; then
      resume=False
      [ -f "$work/heal_mla_$rank/epoch_0/recipe_state.pt" ] && resume=True
      stamp "heal $rank (resume=$resume)"
      "${tune[@]}" mla_recipes/distill_full.py --config configs/smollm2_135m/heal_mla_$rank.yaml \
        device=cuda dtype=bf16 resume_from_checkpoint=$resume ${HEAL_ARGS:-}
    fi
    cp "$work"/heal_mla_$rank/logs/log_*.txt "$results/heal_mla_${rank}_log.txt"
  done
fi

if [ "$stage" = evaluate ]; then
  stamp "held-out perplexity and KL"
  python3 -m mla_components.conversion.pipeline --origin "$work/origin" --device cuda --sequences 16 --seq-len 1024 \
    --checkpoint mla_256_converted="$work/mla_256/model" --checkpoint mla_256_healed="$work/heal_mla_256/epoch_1" \
    > "$results/heldout.json"
  stamp "passkey 1k-8k, standard Landmark prompt (evaluation-only)"
  "${tune[@]}" mla_recipes/passkey_eval.py --config configs/smollm2_135m/passkey_eval_compare.yaml \
    device=cuda dtype=bf16 output_dir="$results/passkey_landmark" prompt_format=landmark \
    "context_lengths=[1024,2048,4096,8000]" trials_per_cell=2 progress=False ${EVAL_ARGS:-}
  stamp "passkey 1k-4k, the project's eval-split templates in the chat format"
  "${tune[@]}" mla_recipes/passkey_eval.py --config configs/smollm2_135m/passkey_eval_compare.yaml \
    device=cuda dtype=bf16 output_dir="$results/passkey_chat" progress=False ${EVAL_ARGS:-}
fi
stamp "done: $stage"
