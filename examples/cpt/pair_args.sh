# Trainer flags of the paper's paired CPT runs; sourced by pretrain_pair.sh and slurm_pair.sbatch.
#
#   pair_args <pair> <uniform|exact>    fills the bash array TRAIN_ARGS
#
# pairs: qwen2.5-0.5b-4k  qwen2.5-0.5b-8k  qwen2.5-0.5b-16k  llama3.2-3b-16k
#        qwen2.5-0.5b-32k  llama3.2-3b-64k   (long contexts, below)
# The two runs of a pair differ only in --loss-weighting. Paths come from the
# environment: DATA (preprocessed prefix), HF_CKPT (converted HF checkpoint,
# see prepare.sh), RUNS (output root), HF_DIR (the HF model, for the config).
#
# Every pair trains the same 512K tokens per step (--global-batch-size x --seq-length).
# Long contexts are spread over GPUs by context parallelism: each of the CP ranks holds
# seq-length / CP tokens of every sequence (divided again by TP under --sequence-parallel),
# so the activation memory per GPU follows seq-length / (TP x CP):
#   qwen2.5-0.5b-32k  TP=1 CP=4  8192 tokens per GPU, as qwen2.5-0.5b-8k at CP=1;
#                     32768 is the model's own max_position_embeddings (no RoPE change);
#   llama3.2-3b-64k   TP=2 CP=4  8192 tokens per GPU, twice llama3.2-3b-16k's (TP=2 CP=2);
#                     inside Llama-3.2's 131072 positions (its RoPE scaling as shipped).
# Both need TP x CP = 4 or 8 GPUs (one 8-GPU node; the rest is DP). With document masking the
# attention work of a step grows with the sum over documents of their squared lengths, not
# with seq-length squared, so the time per step depends on the corpus' document lengths:
# time a few iterations first (--train-iters 20 --eval-iters 0; the trainer logs tokens/s
# and TFLOP/s per GPU), and on an out-of-memory error raise CP (more GPUs) or use
# --recompute-granularity full. No memory or time figures are measured for these two yet.

pair_args() {
    local pair=$1 weighting=$2
    case "$weighting" in uniform|exact) ;; *) echo "weighting must be uniform or exact, got '$weighting'" >&2; return 2 ;; esac
    local model seq tp cp gbs lr
    case "$pair" in
        qwen2.5-0.5b-4k)  model=qwen2.5-0.5b; seq=4096;  tp=1; cp=1; gbs=128; lr=2e-5 ;;
        qwen2.5-0.5b-8k)  model=qwen2.5-0.5b; seq=8192;  tp=1; cp=1; gbs=64;  lr=2e-5 ;;
        qwen2.5-0.5b-16k) model=qwen2.5-0.5b; seq=16384; tp=1; cp=2; gbs=32;  lr=2e-5 ;;
        llama3.2-3b-16k)  model=llama3.2-3b;  seq=16384; tp=2; cp=2; gbs=32;  lr=1e-5 ;;
        qwen2.5-0.5b-32k) model=qwen2.5-0.5b; seq=32768; tp=1; cp=4; gbs=16;  lr=2e-5 ;;
        llama3.2-3b-64k)  model=llama3.2-3b;  seq=65536; tp=2; cp=4; gbs=8;   lr=1e-5 ;;
        *) echo "unknown pair '$pair' (qwen2.5-0.5b-4k, qwen2.5-0.5b-8k, qwen2.5-0.5b-16k, llama3.2-3b-16k," \
                "qwen2.5-0.5b-32k, llama3.2-3b-64k)" >&2; return 2 ;;
    esac
    local out="${RUNS:-runs}/${pair}/${weighting}"
    # Start from the converted HF checkpoint (weights only); after a preemption, from the run's own.
    local sequence_parallel=()
    if [ "$tp" -gt 1 ]; then sequence_parallel=(--sequence-parallel); fi
    local load=(--load "${HF_CKPT:-checkpoints/${model}}" --finetune)
    if [ -f "$out/checkpoints/latest_checkpointed_iteration.txt" ]; then load=(--load "$out/checkpoints"); fi
    TRAIN_ARGS=(
        --model "$model"
        --tensor-model-parallel-size "$tp"
        --context-parallel-size "$cp"
        "${sequence_parallel[@]}"
        --use-distributed-optimizer
        --bf16
        --seq-length "$seq"
        --micro-batch-size 1
        --global-batch-size "$gbs"
        --train-iters 1000
        --lr "$lr"
        --min-lr 1e-6
        --lr-warmup-iters 50
        --lr-decay-style cosine
        --weight-decay 0.1
        --adam-beta1 0.9
        --adam-beta2 0.95
        --clip-grad 1.0
        --recompute-granularity selective
        --data-path "${DATA:-data/${model}_text_document}"
        --split 990,10,0
        --data-cache-path "${RUNS:-runs}/index_cache"
        --loss-weighting "$weighting"
        --exact-alpha 0.15
        --exact-gamma 0.5
        "${load[@]}"
        --save "$out/checkpoints"
        --save-interval 200
        --eval-interval 100
        --eval-iters 20
        --log-interval 10
        --metrics-file "$out/metrics.jsonl"
        --tensorboard-dir "$out/tensorboard"
        --exit-signal-handler
    )
}
