#!/usr/bin/env bash
# Fine-tune BLIP on RSICD and evaluate it: one entry point for a workstation and for SLURM.
#
#   bash launch.sh test              set up .venv, run the test suite offline
#   bash launch.sh demo              set up .venv, run the whole job offline on the repository's RSICD sample
#   bash launch.sh [train flags]     torchrun on every local GPU (one CPU process without), then eval_bleu.py
#   sbatch launch.sh [train flags]   one torchrun per node through srun; requeued when preempted
#
# The last two use the Python environment you already have (PYTHON, default python3), take any
# train_ddp.py flag and add --resume auto, so a requeued or restarted job continues from last.pt.
# Submit sbatch from the repository root: SLURM runs a copy of this file, so the repository is
# found through SLURM_SUBMIT_DIR.
#
#SBATCH --job-name=rsicd-blip
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=rsicd-blip-%j.out
# --signal: SLURM sends SIGUSR1 to this script 180 s before the time limit; the trap below passes it
# to the training processes, which write last.pt and stop. --requeue and --open-mode=append let the
# requeued job continue in the same log. Add --gpus-per-node=N and --nodes=M on the sbatch line.

set -euo pipefail

REQUEUE_EXIT_CODE=3  # train_ddp.py exits with this after writing last.pt on SIGUSR1/SIGTERM

if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  REPO=$SLURM_SUBMIT_DIR
else
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi
cd "$REPO"

log() { echo "[launch.sh $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# ----------------------------------------------------------------------------- environment

setup_venv() {
  # .venv from requirements.txt: created when missing, reinstalled when requirements.txt changed.
  if [[ ! -x .venv/bin/python ]] || ! cmp -s requirements.txt .venv/requirements.txt; then
    log "setting up .venv from requirements.txt"
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    cp requirements.txt .venv/requirements.txt
  fi
  PYTHON=$REPO/.venv/bin/python
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
}

# Print the value of flag $1 in the remaining arguments, or $2 when the flag is absent.
flag_value() {
  local name=$1 value=$2
  shift 2
  while (($#)); do
    case $1 in
      "$name") value=${2:-}; shift ;;
      "$name"=*) value=${1#*=} ;;
    esac
    shift
  done
  printf '%s\n' "$value"
}

has_flag() {
  local name=$1
  shift
  for argument in "$@"; do
    [[ $argument == "$name" || $argument == "$name"=* ]] && return 0
  done
  return 1
}

# Set OUTPUT, MODEL and DATA from the train_ddp.py flags (or their defaults) for the evaluation
# after training, and EXTRA to the flags launch.sh adds: --output-dir if absent, --resume auto.
read_job_flags() {
  OUTPUT=$(flag_value --output-dir outputs/rsicd-blip "$@")
  MODEL=$(flag_value --model Salesforce/blip-image-captioning-base "$@")
  DATA=$(flag_value --data arampacha/rsicd "$@")
  EXTRA=()
  has_flag --output-dir "$@" || EXTRA+=(--output-dir "$OUTPUT")
  has_flag --resume "$@" || EXTRA+=(--resume auto)
}

local_gpu_count() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

# ----------------------------------------------------------------------------- commands

run_tests() {
  setup_venv
  "$PYTHON" -m pytest tests "$@"
}

run_demo() {
  setup_venv
  local data=tests/data/rsicd-mini
  local out=${DEMO_OUTPUT:-outputs/demo}
  local steps=${DEMO_MAX_STEPS:-300}
  rm -rf "$out"

  log "1/4 building a small BLIP with fresh weights from $data"
  "$PYTHON" model.py init-small --data "$data" --output-dir "$out/untrained" --hidden-size 192 --layers 3

  log "2/4 training it with torchrun on 2 CPU processes for $steps steps"
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 train_ddp.py \
    --model "$out/untrained" --data "$data" --output-dir "$out/train" --device cpu --precision fp32 \
    --batch-size 8 --lr 5e-4 --weight-decay 0.05 --max-steps "$steps" --epochs 1000 \
    --eval-every "${DEMO_EVAL_EVERY:-50}" --num-workers 1 --log-every 10

  log "3/4 evaluating the untrained and the trained model on the test split"
  "$PYTHON" eval_bleu.py --model "untrained=$out/untrained" --model "trained=$out/train/best" \
    --data "$data" --split test --device cpu --batch-size 16 --num-workers 1 --output-dir "$out/eval"

  log "4/4 done. Outputs:"
  cat >&2 <<EOF
  TensorBoard logs: $out/train/tensorboard   (tensorboard --logdir $out/train/tensorboard)
  best model:       $out/train/best
  checkpoint:       $out/train/last.pt
  metrics:          $out/eval/metrics.json
  report:           $out/eval/report.md
  gallery:          $out/eval/report.html
EOF
}

# Train with torchrun on this machine, then score the base and the fine-tuned model.
run_local() {
  PYTHON=${PYTHON:-python3}
  local gpus
  gpus=$(local_gpu_count)
  local nproc=$((gpus > 0 ? gpus : 1))
  read_job_flags "$@"

  log "training with torchrun on $nproc process(es) ($gpus GPU(s) visible), output $OUTPUT"
  local status=0
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train_ddp.py "$@" "${EXTRA[@]}" || status=$?
  if ((status != 0)); then
    [[ -e "$OUTPUT/requeue.json" ]] && log "training stopped on a signal; rerun the same command to resume"
    return "$status"
  fi
  evaluate "$nproc" "$MODEL" "$OUTPUT" "$DATA" --standalone
}

evaluate() {
  local nproc=$1 model=$2 output=$3 data=$4
  shift 4
  log "evaluating base ($model) and fine-tuned ($output/best) models"
  "$PYTHON" -m torch.distributed.run "$@" --nproc_per_node="$nproc" eval_bleu.py \
    --model "base=$model" --model "finetuned=$output/best" --data "$data" --split test \
    --output-dir "$output/eval"
}

# The batch script on the first node of a SLURM job: start one torchrun per node through srun.
run_slurm() {
  PYTHON=${PYTHON:-python3}
  local head port
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) || true
  [[ -n "$head" ]] || die "scontrol found no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'; the rendezvous needs the job's first host and will not fall back to localhost"
  getent hosts "$head" >/dev/null || die "the first host of the job, '$head', does not resolve (getent hosts); the rendezvous will not fall back to localhost"
  port=$((29500 + SLURM_JOB_ID % 10000))  # the same on every node, different for concurrent jobs
  read_job_flags "$@"
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local gpus
  gpus=$(local_gpu_count)
  local nproc=$((gpus > 0 ? gpus : 1))

  log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $nproc process(es), rendezvous $head:$port"
  local step_pid status=0 requeue=0
  srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash "$REPO/launch.sh" __node "$head" "$port" "$nodes" "$nproc" "$@" "${EXTRA[@]}" &
  step_pid=$!
  # Both signals make training write last.pt; srun forwards SIGUSR1 to the task on every node.
  # Only SIGUSR1 (the time limit is near, --signal) leads to a requeue here. SIGTERM comes from
  # scancel, which should stop the job, or from preemption, after which SLURM requeues a
  # --requeue job itself.
  trap 'requeue=1; log "SIGUSR1 received: asking training to checkpoint, then requeueing"; kill -USR1 "$step_pid" 2>/dev/null || true' USR1
  trap 'log "SIGTERM received: asking training to checkpoint"; kill -USR1 "$step_pid" 2>/dev/null || true' TERM
  # wait returns early when a trapped signal arrives; keep waiting until srun itself exits.
  while true; do
    wait "$step_pid" && status=0 || status=$?
    kill -0 "$step_pid" 2>/dev/null || break
  done
  trap - USR1 TERM

  if [[ $status -eq $REQUEUE_EXIT_CODE || -e "$OUTPUT/requeue.json" ]]; then
    if ((requeue)); then
      log "training checkpointed on SIGUSR1; requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    log "training checkpointed on SIGTERM; resubmit the same command to resume from $OUTPUT/last.pt"
    exit "$REQUEUE_EXIT_CODE"
  fi
  ((status == 0)) || die "training failed with exit status $status"
  evaluate "$nproc" "$MODEL" "$OUTPUT" "$DATA" --standalone
}

# One srun task per node: torchrun with the c10d rendezvous on the first host.
run_node() {
  local head=$1 port=$2 nodes=$3 nproc=$4
  shift 4
  PYTHON=${PYTHON:-python3}
  "$PYTHON" -m torch.distributed.run --nnodes="$nodes" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \
    train_ddp.py "$@" &
  local agent=$!
  # torchrun's agent dies on SIGUSR1, so the signal goes to its workers, which checkpoint and exit.
  trap 'pkill -USR1 -P "$agent" || true' USR1 TERM
  local status=0
  while true; do
    wait "$agent" && status=0 || status=$?
    kill -0 "$agent" 2>/dev/null || break
  done
  exit "$status"
}

case "${1:-}" in
  test) shift; run_tests "$@" ;;
  demo) shift; run_demo "$@" ;;
  __node) shift; run_node "$@" ;;
  *)
    if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_STEP_ID:-}" ]]; then
      run_slurm "$@"
    else
      run_local "$@"
    fi
    ;;
esac
