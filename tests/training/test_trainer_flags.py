"""Every advertised trainer flag, run through the real ``Trainer`` (one rank, in this process), with
its effect asserted against an independent value: the learning-rate schedules against their closed
forms, activation recompute by counting the forwards that really run, the loss options against the
EXACT formulas re-implemented in ``tests/exact_reference.py``, the checkpoint options (and RNG restore
with dropout) by what the resumed run computes, the ``skip`` NaN policy by the state a skipped step
leaves behind. Multi-rank runs of the same trainer: test_runs.py, test_trainer_layouts.py,
test_paper_configuration.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron_exact.checkpoint import write_tracker_atomically
from tests import exact_reference as ref
from tests.training.conftest import training_lines

pytestmark = pytest.mark.slow  # trainings

SEQ = 64
MAX_LR, MIN_LR = 1e-3, 1e-4
WARMUP, DECAY, WSD_DECAY = 2, 5, 2


def flags(corpus, *extra):
    """A tiny qwen2 on the byte corpus: 2 sequences of 64 tokens per step, no validation."""
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", str(SEQ), "--micro-batch-size", "1",
            "--global-batch-size", "2", "--lr", str(MAX_LR), "--data-path", corpus, "--split", "90,10,0",
            "--eval-iters", "0", "--log-interval", "1", "--loss-weighting", "exact", *extra]


def train(build, argv):
    trainer = build(argv)
    trainer.train()
    trainer.close()
    return trainer


def closed_form_lr(style: str, completed_steps: int) -> float:
    """Megatron-LM's schedules, in iterations: linear warm-up from 0 over WARMUP, decay to MIN_LR at DECAY;
    WSD: stable at MAX_LR until DECAY - WSD_DECAY, then the exponential anneal 2 * 0.5**r - 1."""
    t = completed_steps
    if t <= WARMUP:
        return MAX_LR * t / WARMUP
    if t > DECAY:
        return MIN_LR
    ratio = (t - WARMUP) / (DECAY - WARMUP)
    if style == "linear":
        coefficient = 1.0 - ratio
    elif style == "cosine":
        coefficient = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # WSD
        anneal_start = DECAY - WSD_DECAY
        coefficient = 1.0 if t <= anneal_start else 2.0 * 0.5 ** ((t - anneal_start) / WSD_DECAY) - 1.0
    return MIN_LR + coefficient * (MAX_LR - MIN_LR)


class ForwardCounter:
    """Counts forward calls of the core-attention and MLP modules (a recomputed module runs twice)."""

    def __init__(self, model):
        from megatron.core.transformer.mlp import MLP

        from megatron_exact.model.attention import PackedDocumentAttention

        self.counts = {"attention": 0, "mlp": 0}
        for module in model.modules():
            kind = "attention" if isinstance(module, PackedDocumentAttention) else "mlp" if isinstance(module, MLP) else None
            if kind:
                module.register_forward_hook(lambda *_, kind=kind: self.counts.__setitem__(kind, self.counts[kind] + 1))


SCHEDULE_RUNS = {  # style -> recompute flags (each run also checks one recompute setting)
    "cosine": (),
    "linear": ("--recompute-granularity", "selective"),
    "WSD": ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"),
}


@pytest.fixture(scope="module")
def schedule_runs(byte_corpus, in_process_trainers, tmp_path_factory):
    runs = {}
    for style, recompute in SCHEDULE_RUNS.items():
        metrics = tmp_path_factory.mktemp(style) / "metrics.jsonl"
        argv = flags(byte_corpus, "--train-iters", "7", "--lr-decay-style", style, "--lr-warmup-iters", str(WARMUP),
                     "--lr-decay-iters", str(DECAY), "--min-lr", str(MIN_LR), "--lr-wsd-decay-iters", str(WSD_DECAY),
                     "--metrics-file", str(metrics), *recompute)
        trainer = in_process_trainers(argv)
        counter = ForwardCounter(trainer.module)
        trainer.train()
        trainer.close()
        runs[style] = (training_lines(metrics), counter.counts, trainer)
    return runs


@pytest.mark.parametrize("style", list(SCHEDULE_RUNS))
def test_lr_schedule_and_min_lr_follow_the_closed_form(schedule_runs, style):
    lines, _, _ = schedule_runs[style]
    assert [r["iteration"] for r in lines] == list(range(1, 8))
    expected = [closed_form_lr(style, r["iteration"] - 1) for r in lines]
    assert [r["lr"] for r in lines] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lines[-1]["lr"] == pytest.approx(MIN_LR, rel=1e-9)  # past --lr-decay-iters: --min-lr, not 0


def test_recompute_granularity_recomputes_what_it_says(schedule_runs):
    """7 steps x 2 micro-batches x 2 layers: every forward once without recompute; core attention twice
    with ``selective``; whole layers (attention and MLP) twice with ``full``. Gradients do not change."""
    forwards = 7 * 2 * 2
    assert schedule_runs["cosine"][1] == {"attention": forwards, "mlp": forwards}
    assert schedule_runs["linear"][1] == {"attention": 2 * forwards, "mlp": forwards}
    assert schedule_runs["WSD"][1] == {"attention": 2 * forwards, "mlp": 2 * forwards}
    assert schedule_runs["linear"][2].config.recompute_granularity == "selective"
    # The first step (lr 0 in warm-up) runs on the same weights in every run: same loss, same gradient norm.
    first = [schedule_runs[style][0][0] for style in SCHEDULE_RUNS]
    for line in first[1:]:
        assert line["loss"] == pytest.approx(first[0]["loss"], rel=1e-6)
        assert line["grad_norm"] == pytest.approx(first[0]["grad_norm"], rel=1e-5)


class LossCapture:
    """Wraps the trainer's loss function: keeps every micro-batch and per-token loss it is given."""

    def __init__(self, trainer):
        self.calls = []
        inner = trainer.exact_loss.loss_func

        def capture(packed, output_tensor):
            loss, num_tokens, report = inner(packed, output_tensor)
            self.calls.append((packed, output_tensor.detach().double().reshape(-1).clone(), float(loss.detach())))
            return loss, num_tokens, report

        trainer.exact_loss.loss_func = capture


def test_exact_scope_microbatch_and_weights_normalization(byte_corpus, in_process_trainers, tmp_path):
    """``--exact-scope microbatch``: each micro-batch's weights come from its own bucket counts;
    ``--exact-normalization weights``: objective = sum w CE m / sum w m. Both against the reference."""
    metrics = tmp_path / "metrics.jsonl"
    trainer = in_process_trainers(
        flags(byte_corpus, "--train-iters", "1", "--global-batch-size", "4", "--exact-scope", "microbatch",
              "--exact-normalization", "weights", "--exact-tau", "16", "--metrics-file", str(metrics)))
    capture = LossCapture(trainer)
    trainer.train()
    trainer.close()
    (line,) = training_lines(metrics)
    assert len(capture.calls) == 4
    # Document masking is on: documents start inside the micro-batches (positions restart).
    assert any(packed.position_ids.tolist()[0] != list(range(SEQ)) for packed, _, _ in capture.calls)

    n_buckets = ref.n_buckets_for(SEQ)
    weighted_ce = weight_sum = ce_sum = tokens = 0.0
    step_counts = [0] * n_buckets
    microbatch_weights = []
    for packed, ce, returned in capture.calls:
        (positions,) = packed.position_ids.tolist()
        (mask,) = packed.loss_mask.tolist()
        counts = ref.bucket_counts(positions, mask, n_buckets)
        step_counts = [a + b for a, b in zip(step_counts, counts)]
        weights = ref.bucket_weights(counts, tau=16)
        microbatch_weights.append(weights)
        w = [weights[ref.bucket_of(p)] * m for p, m in zip(positions, mask)]
        weighted_ce += sum(wi * c for wi, c in zip(w, ce.tolist()))
        weight_sum += sum(w)
        ce_sum += sum(m * c for m, c in zip(mask, ce.tolist()))
        tokens += sum(mask)
    assert line["tokens"] == tokens
    assert line["lm_loss"] == pytest.approx(ce_sum / tokens, rel=1e-6)
    assert line["loss"] == pytest.approx(weighted_ce / weight_sum, rel=1e-6)
    # The options matter on this batch: the micro-batches' weights differ, and neither the step's
    # weights nor a division by the token count give this objective.
    assert max(abs(a - b) for a, b in zip(microbatch_weights[0], microbatch_weights[1])) > 1e-3
    assert abs(line["loss"] - weighted_ce / tokens) > 1e-4 * line["loss"]
    step_weights = ref.bucket_weights(step_counts, tau=16)
    step_objective = sum(
        step_weights[ref.bucket_of(p)] * m * c
        for packed, ce, _ in capture.calls
        for p, m, c in zip(packed.position_ids.tolist()[0], packed.loss_mask.tolist()[0], ce.tolist())
    ) / sum(step_weights[b] * c for b, c in enumerate(step_counts))
    assert abs(line["loss"] - step_objective) > 1e-5 * line["loss"]


def test_no_document_masking_and_vocab_padding(byte_corpus, in_process_trainers, tmp_path):
    """``--no-document-masking``: positions 0..S-1 and one document per sample reach the loss, every
    token supervised; ``--make-vocab-size-divisible-by 64``: a 300-token vocabulary pads to 320 (not 384)."""
    metrics = tmp_path / "metrics.jsonl"
    argv = flags(byte_corpus, "--train-iters", "1", "--global-batch-size", "4", "--micro-batch-size", "2",
                 "--no-document-masking", "--vocab-size", "300", "--make-vocab-size-divisible-by", "64",
                 "--metrics-file", str(metrics))
    trainer = in_process_trainers(argv)
    capture = LossCapture(trainer)
    trainer.train()
    trainer.close()
    assert trainer.padded_vocab_size == 320
    assert trainer.module.embedding.word_embeddings.weight.shape[0] == 320
    for packed, ce, _ in capture.calls:
        assert packed.position_ids.tolist()[0] == list(range(SEQ)) * 2
        assert packed.packed_seq_params.cu_seqlens_q.tolist() == [0, SEQ, 2 * SEQ]
        assert packed.loss_mask.sum().item() == 2 * SEQ
    (line,) = training_lines(metrics)
    assert line["tokens"] == 4 * SEQ


def _adam_state(trainer) -> list[dict]:
    """Adam's per-parameter state (moments, step count), parameter by parameter."""
    states = []
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                states.append(copy.deepcopy(inner.optimizer.state.get(param, {})))
    return states


def _state_snapshot(trainer) -> dict:
    return {
        "weights": {name: p.detach().clone() for name, p in trainer.module.named_parameters()},
        "optimizer": _adam_state(trainer),
        "scheduler_steps": trainer.scheduler.num_steps,
        "consumed": trainer.consumed_train_samples,
    }


def _assert_same_tensors(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_tensors(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_nan_skip_policy_leaves_the_state_of_the_model_unchanged(byte_corpus, in_process_trainers, tmp_path):
    """An absurd learning rate makes step 2's loss NaN: with ``--nan-loss-policy skip`` that step changes
    neither the weights nor Adam's moments and step count nor the LR schedule. As in Megatron-LM's
    skipped iterations, the batch counts as consumed: the next step reads the next batch."""
    metrics = tmp_path / "metrics.jsonl"
    trainer = in_process_trainers(flags(byte_corpus, "--train-iters", "1", "--lr", "1e30", "--lr-warmup-iters", "0",
                                        "--nan-loss-policy", "skip", "--metrics-file", str(metrics)))
    trainer.train()  # iteration 1: an enormous (finite) update
    before = _state_snapshot(trainer)
    assert all(state["exp_avg"].abs().sum() > 0 for state in before["optimizer"])
    assert before["scheduler_steps"] == 2
    trainer.args.train_iters = 3
    trainer.train()  # iterations 2 and 3: NaN, skipped
    trainer.close()
    after = _state_snapshot(trainer)
    lines = training_lines(metrics)
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    assert "skipped" not in lines[0] and lines[1]["skipped"] and lines[2]["skipped"]
    assert not math.isfinite(lines[1]["loss"] if lines[1]["loss"] is not None else float("nan"))
    _assert_same_tensors(after["weights"], before["weights"])
    _assert_same_tensors(after["optimizer"], before["optimizer"])
    assert after["scheduler_steps"] == before["scheduler_steps"]
    assert after["consumed"] == before["consumed"] + 2 * 2
    assert lines[1]["batch_sha1"] != lines[2]["batch_sha1"]


@pytest.fixture(scope="module")
def dropout_runs(byte_corpus, in_process_trainers, tmp_path_factory):
    """With dropout 0.1: 4 steps saving at 2 and 4 (the reference), then the tracker put back to 2."""
    root = tmp_path_factory.mktemp("dropout")
    base = flags(byte_corpus, "--train-iters", "4", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                 "--lr-warmup-iters", "0", "--loss-weighting", "uniform")
    straight = root / "straight.jsonl"
    train(in_process_trainers, base + ["--save", str(root / "ckpt"), "--save-interval", "2",
                                       "--metrics-file", str(straight)])
    write_tracker_atomically(root / "ckpt", 2)
    return base + ["--load", str(root / "ckpt")], {r["iteration"]: r for r in training_lines(straight)}, root


def test_uniform_weighting_objective_is_the_cross_entropy(dropout_runs):
    _, straight, _ = dropout_runs
    for line in straight.values():
        assert line["loss"] == pytest.approx(line["lm_loss"], rel=1e-6)
        assert set(line["exact"]["bucket_weights"]) == {1.0}


def _resumed(build, argv, root, name):
    metrics = root / f"{name}.jsonl"
    trainer = build(argv + ["--metrics-file", str(metrics)])
    loaded = {"iteration": trainer.iteration, "consumed": trainer.consumed_train_samples,
              "optimizer_state": any(_adam_state(trainer)),
              "weights": {name: p.detach().clone() for name, p in trainer.module.named_parameters()}}
    trainer.train()
    trainer.close()
    return loaded, {r["iteration"]: r for r in training_lines(metrics)}


def test_resume_with_dropout_restores_rng_and_no_load_rng_does_not(dropout_runs, in_process_trainers):
    """Dropout draws from the RNG: resuming gives the straight run's losses bit for bit only because
    the checkpoint restores the RNG states; ``--no-load-rng`` draws other masks, so other losses."""
    argv, straight, root = dropout_runs
    loaded, resumed = _resumed(in_process_trainers, argv, root, "resumed")
    assert loaded["iteration"] == 2 and sorted(resumed) == [3, 4]
    for iteration in (3, 4):
        assert resumed[iteration]["batch_sha1"] == straight[iteration]["batch_sha1"]
        assert resumed[iteration]["loss"] == straight[iteration]["loss"]
        assert resumed[iteration]["grad_norm"] == straight[iteration]["grad_norm"]
    _, fresh_rng = _resumed(in_process_trainers, argv + ["--no-load-rng"], root, "no_load_rng")
    assert fresh_rng[3]["batch_sha1"] == straight[3]["batch_sha1"]
    assert abs(fresh_rng[3]["loss"] - straight[3]["loss"]) > 1e-6 * straight[3]["loss"]


def test_no_load_optim_and_finetune(dropout_runs, in_process_trainers):
    """``--no-load-optim``: weights, data position and RNG resume, Adam and the LR schedule start fresh
    (Megatron-LM's meaning): step 3's loss is the straight run's, its lr the schedule's start, step 4
    differs. ``--finetune``: the checkpoint's weights at iteration 0, nothing else."""
    argv, straight, root = dropout_runs
    loaded, fresh_optimizer = _resumed(in_process_trainers, argv + ["--no-load-optim"], root, "no_load_optim")
    assert loaded["iteration"] == 2 and loaded["consumed"] == 4 and not loaded["optimizer_state"]
    assert fresh_optimizer[3]["loss"] == straight[3]["loss"]
    assert fresh_optimizer[3]["lr"] == pytest.approx(MAX_LR) and straight[3]["lr"] < MAX_LR
    assert fresh_optimizer[4]["loss"] != straight[4]["loss"]

    finetune_loaded, finetuned = _resumed(in_process_trainers, argv + ["--finetune"], root, "finetune")
    assert finetune_loaded["iteration"] == 0 and finetune_loaded["consumed"] == 0
    assert not finetune_loaded["optimizer_state"]
    _assert_same_tensors(finetune_loaded["weights"], loaded["weights"])  # the iteration-2 weights
    assert sorted(finetuned) == [1, 2, 3, 4]
    assert finetuned[1]["batch_sha1"] == straight[1]["batch_sha1"] and finetuned[1]["loss"] < straight[1]["loss"]


@pytest.mark.parametrize("optimizer", [(), ("--use-distributed-optimizer",)])
def test_optimizer_state_written_in_fp32_is_refused_under_bf16(dropout_runs, in_process_trainers, optimizer):
    """The fp32 plain optimizer keeps no main weights of its own: a --bf16 resume (whose optimizer
    steps fp32 main copies) cannot honour its state, and says which flags decide."""
    from megatron_exact.training.checkpointing import OptimizerLayoutError

    argv, _, root = dropout_runs
    with pytest.raises(OptimizerLayoutError, match=r"written without --bf16 and this run is with it.*--no-load-optim"):
        in_process_trainers(argv + ["--bf16", *optimizer])


def test_bf16_resume_across_the_distributed_optimizer(byte_corpus, in_process_trainers, tmp_path, capsys):
    """Under --bf16 both optimizers step fp32 main copies of the weights, kept under other names
    (the plain one's ``fp32_param``, the distributed one's ``param``): a plain checkpoint resumes
    with --use-distributed-optimizer, and that run's checkpoint resumes without it, each
    continuing the uninterrupted plain run (6 steps)."""
    import shutil

    base = flags(byte_corpus, "--train-iters", "6", "--bf16", "--lr-warmup-iters", "0", "--save-interval", "2")
    straight_ckpt, chain_ckpt = tmp_path / "straight", tmp_path / "chain"
    train(in_process_trainers, base + ["--save", str(straight_ckpt), "--metrics-file", str(tmp_path / "straight.jsonl")])
    straight = {r["iteration"]: r for r in training_lines(tmp_path / "straight.jsonl")}
    shutil.copytree(straight_ckpt / "iter_0000002", chain_ckpt / "iter_0000002")
    write_tracker_atomically(chain_ckpt, 2)
    chain = ["--save", str(chain_ckpt), "--load", str(chain_ckpt)]
    distributed = train(in_process_trainers, base + chain + ["--use-distributed-optimizer", "--exit-interval", "4",
                                                             "--metrics-file", str(tmp_path / "distributed.jsonl")])
    assert distributed.iteration == 4
    assert ("optimizer state written without --use-distributed-optimizer (plain bf16 optimizer), resumed with "
            "--use-distributed-optimizer (distributed optimizer)") in capsys.readouterr().out
    train(in_process_trainers, base + chain + ["--metrics-file", str(tmp_path / "plain.jsonl")])
    assert ("optimizer state written with --use-distributed-optimizer (distributed optimizer), resumed without "
            "--use-distributed-optimizer (plain bf16 optimizer)") in capsys.readouterr().out
    resumed = {r["iteration"]: r for name in ("distributed", "plain") for r in training_lines(tmp_path / f"{name}.jsonl")}
    assert sorted(resumed) == [3, 4, 5, 6]
    for iteration, line in resumed.items():
        assert line["batch_sha1"] == straight[iteration]["batch_sha1"]
        assert line["loss"] == pytest.approx(straight[iteration]["loss"], rel=1e-5), iteration
        assert line["grad_norm"] == pytest.approx(straight[iteration]["grad_norm"], rel=1e-5), iteration
    assert straight[6]["loss"] < straight[1]["loss"]
    # The distributed bf16 checkpoint (iteration 4) under an fp32 plain run would lose its fp32 main weights.
    from megatron_exact.training.checkpointing import OptimizerLayoutError

    write_tracker_atomically(chain_ckpt, 4)
    with pytest.raises(OptimizerLayoutError, match=r"written with --bf16 and this run is without it.*--no-load-optim"):
        in_process_trainers([a for a in base if a != "--bf16"] + chain)
