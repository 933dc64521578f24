#!/usr/bin/env bash
# Shared launcher of the sbatch templates (sft.sbatch, sft_multinode.sbatch, dpo.sbatch, eval.sbatch): runs
# `tune run RECIPE --config CONFIG [overrides]` on every node of the allocation, one Slurm task per node.
#
#   sbatch slurm/sft.sbatch [key=value ...]          # extra arguments are Torchtune config overrides
#
# Environment (all optional unless noted; the templates set RECIPE/CONFIG/DISTRIBUTED):
#   RECIPE, CONFIG     Torchtune recipe (built-in name or path) and config file (required)
#   DISTRIBUTED        1: torchrun (standalone on one node, c10d rendezvous across nodes); 0: one plain process
#   RESUME             1: continue from OUTPUT_DIR's newest intermediate epoch if there is one (training); 0: never
#   NPROC_PER_NODE     processes per node; default: the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), or 1
#   RUNS_ROOT          runs live in RUNS_ROOT/<job name> (default: <submit dir>/outputs/slurm)
#   OUTPUT_DIR         this run's directory (default: RUNS_ROOT/<job name>); same name => same run => resume
#   CHECKPOINT_DIR     base model directory (passed as checkpointer.checkpoint_dir); default: the config's
#   REF_CHECKPOINT_DIR DPO reference model directory (passed as ref_checkpointer.checkpoint_dir)
#   INIT_MODEL         e.g. mla_tiny: write a freshly initialised model to CHECKPOINT_DIR first if it has none
#   DEVICE             cpu: CPU/gloo mode (passes device=cpu; no GPU needed); default: the config's device
#   VENV               virtualenv to put first on PATH (default: the submitting shell's PATH, which sbatch exports)
#   RDZV_HOST, RDZV_PORT   c10d rendezvous endpoint (default: the head node's Slurm NodeAddr, 29500 + job id % 1000)
#   NCCL_*, GLOO_SOCKET_IFNAME, ...   exported to every task unchanged (srun passes the whole environment)
set -euo pipefail

log() { echo "[launch $(date +%H:%M:%S)] $*"; }
die() { echo "[launch] error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this through sbatch (e.g. sbatch slurm/sft.sbatch); SLURM_JOB_ID is not set"
: "${RECIPE:?RECIPE is not set (the sbatch templates set it, e.g. full_finetune_distributed)}"
: "${CONFIG:?CONFIG is not set (e.g. CONFIG=configs/mla_tiny/sft_distributed.yaml)}"
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist (submit from the repository root or give an absolute path)"
DISTRIBUTED=${DISTRIBUTED:-1}
[[ $DISTRIBUTED == 0 || $DISTRIBUTED == 1 ]] || die "DISTRIBUTED=$DISTRIBUTED: use 1 (torchrun) or 0 (one process)"
if [[ -n ${VENV:-} ]]; then
  [[ -x $VENV/bin/tune ]] || die "VENV=$VENV has no bin/tune (make setup creates .venv)"
  export PATH="$VENV/bin:$PATH"
fi
command -v tune >/dev/null || die "tune is not on PATH: activate the virtualenv before sbatch, or set VENV"

NNODES=${SLURM_JOB_NUM_NODES:-1}
gpus_on_node=${SLURM_GPUS_ON_NODE:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$((gpus_on_node > 0 ? gpus_on_node : 1))}
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE: need a positive integer"
RUNS_ROOT=${RUNS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/outputs/slurm}
OUTPUT_DIR=${OUTPUT_DIR:-$RUNS_ROOT/$SLURM_JOB_NAME}
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$OUTPUT_DIR/slurm_logs/job${SLURM_JOB_ID}-restart$RESTART
mkdir -p "$LOG_DIR"

overrides=("output_dir=$OUTPUT_DIR")
if [[ -n ${CHECKPOINT_DIR:-} ]]; then
  if [[ ! -f $CHECKPOINT_DIR/config.json && -n ${INIT_MODEL:-} ]]; then
    log "writing a freshly initialised $INIT_MODEL to $CHECKPOINT_DIR"
    python -m mla_components.checkpointing.init --model "$INIT_MODEL" --output "$CHECKPOINT_DIR"
  fi
  [[ -f $CHECKPOINT_DIR/config.json ]] || die "CHECKPOINT_DIR=$CHECKPOINT_DIR has no config.json (set INIT_MODEL=mla_tiny to create one)"
  overrides+=("checkpointer.checkpoint_dir=$CHECKPOINT_DIR")
elif [[ -n ${INIT_MODEL:-} ]]; then
  die "INIT_MODEL=$INIT_MODEL needs CHECKPOINT_DIR (where to write the initial model)"
fi
if [[ -n ${REF_CHECKPOINT_DIR:-} ]]; then
  overrides+=("ref_checkpointer.checkpoint_dir=$REF_CHECKPOINT_DIR")
fi
if [[ -n ${DEVICE:-} ]]; then
  overrides+=("device=$DEVICE")
fi

# Requeued (or resubmitted under the same job name): continue from the newest intermediate epoch.
if [[ ${RESUME:-1} == 1 ]]; then
  set +e
  resume_from=$(python -m mla_components.checkpointing.latest "$OUTPUT_DIR" 2>"$LOG_DIR/latest.err")
  status=$?
  set -e
  case $status in
    0) log "resuming from $resume_from"; overrides+=("resume_from_checkpoint=True") ;;
    1) log "no resumable checkpoint in $OUTPUT_DIR: starting from the base model" ;;
    *) cat "$LOG_DIR/latest.err" >&2; die "could not inspect $OUTPUT_DIR for checkpoints (exit $status)" ;;
  esac
fi

tune_args=()
if [[ $DISTRIBUTED == 1 ]]; then
  if ((NNODES == 1)); then
    tune_args=(--nnodes 1 --nproc_per_node "$NPROC_PER_NODE" --standalone)
  else
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # The address Slurm itself uses for the head node (NodeAddr; the node name when none is configured).
    RDZV_HOST=${RDZV_HOST:-$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
    [[ -n $RDZV_HOST ]] || die "no NodeAddr for head node $head_node in scontrol's output: set RDZV_HOST"
    RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
    tune_args=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
               --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID")
  fi
elif ((NNODES > 1)); then
  die "DISTRIBUTED=0 runs one process: submit it with --nodes=1"
fi

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $RESTART on $NNODES node(s) x $NPROC_PER_NODE process(es)"
log "recipe $RECIPE, config $CONFIG, output $OUTPUT_DIR, per-node logs $LOG_DIR/node<index>-<host>.log"
log "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<unset>} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-<unset>}"
# Torchtune 0.6.1's distributed recipes assume CUDA in three places (mla_components/compat/torchtune.py); its
# sitecustomize installs CPU fallbacks in every rank, and changes nothing on nodes with CUDA.
compat_site=$(python -c 'from mla_components.compat.torchtune import SITE_DIR; print(SITE_DIR)') ||
  die "mla_components is not importable with $(command -v python): install the project (make setup)"
export PYTHONPATH="$compat_site${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DIST_INIT_BARRIER=${TORCH_DIST_INIT_BARRIER:-1}
export LOGLEVEL=${LOGLEVEL:-INFO}  # torchrun then logs the rendezvous result (group rank, world size) of each node

# Slurm 22.05's srun does not inherit the job's --cpus-per-task: pass it on, or every rank shares one core.
srun --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 --output="$LOG_DIR/node%n-%N.log" \
  tune run "${tune_args[@]}" "$RECIPE" --config "$CONFIG" "${overrides[@]}" "$@"
log "finished"
