# The trainer as one SLURM job step, with preemption turned into a checkpoint and a requeue.
# Sourced by slurm_pair.sbatch (and by the tests, with stand-ins for srun and scontrol).
#
#   train_step <trainer flags...>     runs, and returns the status the job should exit with
#
# srun starts one torchrun agent per node (python -m megatron_exact.launch: torchrun with
# its flags unchanged, which names the endpoint and the timeout when the nodes cannot meet,
# and gives every restart round a store of its own so that --max-restarts resumes across
# nodes); the agents rendezvous through the first node (c10d). A node that cannot reach the
# endpoint gives up after read_timeout, a rendezvous short of nodes after join_timeout
# (RDZV_JOIN_TIMEOUT_S, default 600 s: the nodes of a large allocation start minutes apart;
# the tests use 5 s). When SLURM signals the batch shell (#SBATCH --signal=B:USR1@<seconds>, or SIGTERM
# on preemption), the trap sends SIGTERM to srun, which forwards it to every torchrun agent;
# each agent sends SIGTERM to its workers and waits for them up to its shutdown grace
# (SAVE_GRACE_S, default 300 s, given to torchrun as TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torchrun's
# own default is 30 s) before SIGKILL. The trainer (--exit-signal-handler) finishes its
# iteration, saves a checkpoint and exits. Then the job is requeued (scontrol requeue) and
# the batch script exits 0; the requeued job resumes from that checkpoint.
#
# Environment: SLURM_JOB_ID, SLURM_NNODES, SLURM_JOB_NODELIST (set by SLURM), GPUS (per
# node, default 8), RDZV_PORT (default 29500), RDZV_JOIN_TIMEOUT_S (default 600),
# RDZV_READ_TIMEOUT_S (default 60), SAVE_GRACE_S, REPO (the repository).

train_step() {
    local head_node
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    TRAIN_STEP_PREEMPTED=0
    TRAIN_STEP_SIGNALS=0
    trap '_train_step_preempted USR1' USR1
    trap '_train_step_preempted TERM' TERM
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SAVE_GRACE_S:-300}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
        srun --kill-on-bad-exit=1 python -m megatron_exact.launch \
        --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS:-8}" \
        --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:${RDZV_PORT:-29500}" \
        --rdzv-conf "join_timeout=${RDZV_JOIN_TIMEOUT_S:-600},read_timeout=${RDZV_READ_TIMEOUT_S:-60}" \
        --max-restarts 3 \
        "$REPO/tools/pretrain_exact.py" "$@" &
    TRAIN_STEP_PID=$!
    local status wakeups
    # A trapped signal interrupts `wait` (which then returns 128 + the signal): wait again
    # until it returns because the step ended.
    while :; do
        wakeups=$TRAIN_STEP_SIGNALS
        status=0
        wait "$TRAIN_STEP_PID" || status=$?
        if [ "$TRAIN_STEP_SIGNALS" = "$wakeups" ]; then break; fi
    done
    trap - USR1 TERM
    if [ "$TRAIN_STEP_PREEMPTED" = 0 ]; then
        return "$status"
    fi
    echo "train_step: the step ended (status $status) after the signal; requeueing job $SLURM_JOB_ID" >&2
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "train_step: scontrol requeue failed (is the job requeueable? #SBATCH --requeue): resubmit it" \
             "by hand; it resumes from its last checkpoint" >&2
        return 1
    fi
    return 0
}

_train_step_preempted() {
    TRAIN_STEP_SIGNALS=$((TRAIN_STEP_SIGNALS + 1))
    if [ "$TRAIN_STEP_PREEMPTED" = 1 ]; then return; fi
    TRAIN_STEP_PREEMPTED=1
    echo "train_step: SIG$1 received: asking the trainer to save (SIGTERM to the step, grace" \
         "${SAVE_GRACE_S:-300} s)" >&2
    kill -TERM "$TRAIN_STEP_PID" 2>/dev/null || true
}
