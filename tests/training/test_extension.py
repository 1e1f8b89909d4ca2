"""Extending or re-planning a run as in Megatron-LM (the real ``Trainer``, one rank, in this process):
a resume whose schedule flags differ from the checkpoint's is refused unless
``--override-opt_param-scheduler`` (this run's schedule from the checkpoint's step on) or
``--use-checkpoint-opt_param-scheduler`` (the checkpoint's) is given; the learning rates the new
iterations get under each are checked against the closed form. Extension keeps the data order:
the consumed samples are those of the longer plan, and the extension continues with the samples a
straight run reads; an extension that would make Megatron-Core reshuffle is refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from megatron_exact.training.arguments import ConfigError, build_parser, parse_args, validate_args
from megatron_exact.training.checkpointing import ScheduleMismatchError
from tests.training.conftest import training_lines

SEQ, GBS = 64, 2
MAX_LR, MIN_LR, WARMUP = 1e-3, 1e-4, 1


def flags(corpus, train_iters, *extra):
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", str(SEQ), "--micro-batch-size", "1",
            "--global-batch-size", str(GBS), "--lr", str(MAX_LR), "--min-lr", str(MIN_LR), "--lr-warmup-iters",
            str(WARMUP), "--lr-decay-style", "cosine", "--data-path", corpus, "--split", "90,10,0",
            "--eval-iters", "0", "--log-interval", "1", "--loss-weighting", "exact", "--train-iters", str(train_iters),
            *extra]


def cosine_lr(completed_steps: int, decay_iters: int) -> float:
    """Megatron-LM's warm-up + cosine schedule, in iterations."""
    if completed_steps <= WARMUP:
        return MAX_LR * completed_steps / WARMUP
    if completed_steps > decay_iters:
        return MIN_LR
    ratio = (completed_steps - WARMUP) / (decay_iters - WARMUP)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (MAX_LR - MIN_LR)


def run(build, argv, metrics):
    trainer = build(argv + ["--metrics-file", str(metrics)])
    trainer.train()
    trainer.close()
    return {r["iteration"]: r for r in training_lines(metrics)}


def test_both_spellings_of_both_flags_and_they_exclude_each_other(byte_corpus):
    parser = build_parser()
    base = flags(byte_corpus, 6)
    for spelling in ("--override-opt_param-scheduler", "--override-opt-param-scheduler"):
        args = parser.parse_args(base + [spelling])
        assert args.override_opt_param_scheduler and not args.use_checkpoint_opt_param_scheduler
    for spelling in ("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        args = parser.parse_args(base + [spelling])
        assert args.use_checkpoint_opt_param_scheduler and not args.override_opt_param_scheduler
    args = parse_args(base + ["--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"])
    with pytest.raises(ConfigError, match="--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler"):
        validate_args(args, world_size=1)


@pytest.fixture(scope="module")
def plans(byte_corpus, in_process_trainers, tmp_path_factory):
    """A straight 6-iteration run, and a 3-iteration run of the same flags saving at its end."""
    root = tmp_path_factory.mktemp("extension")
    straight = run(in_process_trainers, flags(byte_corpus, 6), root / "straight.jsonl")
    short = run(in_process_trainers, flags(byte_corpus, 3, "--save", str(root / "ckpt")), root / "short.jsonl")
    return straight, short, root


def extend(build, corpus, root, name, *extra):
    """The 3-iteration run resumed with --train-iters 6 (its metrics file continued)."""
    ckpt, metrics = root / f"{name}_ckpt", root / f"{name}.jsonl"
    shutil.copytree(root / "ckpt", ckpt)
    shutil.copy(root / "short.jsonl", metrics)
    return run(build, flags(corpus, 6, "--load", str(ckpt), "--save", str(ckpt), *extra), metrics)


@pytest.mark.slow  # trainings
def test_plans_of_3_and_6_iterations_read_the_same_first_batches(plans):
    straight, short, _ = plans
    assert sorted(short) == [1, 2, 3] and sorted(straight) == list(range(1, 7))
    for iteration in (1, 2, 3):
        assert short[iteration]["batch_sha1"] == straight[iteration]["batch_sha1"]
    assert len({straight[i]["batch_sha1"] for i in straight}) == 6
    # The schedules differ (decay over 3 and over 6 iterations): what the resume has to reconcile.
    assert short[3]["lr"] == pytest.approx(cosine_lr(2, 3)) and straight[3]["lr"] == pytest.approx(cosine_lr(2, 6))
    assert short[3]["lr"] != pytest.approx(straight[3]["lr"])


@pytest.mark.slow  # trainings
def test_extension_without_a_flag_is_refused_naming_the_settings_and_both_flags(plans, byte_corpus,
                                                                                in_process_trainers):
    _, _, root = plans
    with pytest.raises(ScheduleMismatchError) as refused:
        extend(in_process_trainers, byte_corpus, root, "refused")
    message = str(refused.value)
    assert "--lr-decay-iters (default --train-iters) x --global-batch-size (decay samples): checkpoint 6, this run 12" \
        in message
    assert "--train-iters x --global-batch-size (weight-decay schedule samples): checkpoint 6, this run 12" in message
    assert "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param-scheduler" in message
    assert "--lr:" not in message and "--min-lr" not in message  # only what differs


@pytest.mark.slow  # trainings
def test_override_follows_the_new_schedule_and_continues_the_data_of_a_straight_run(plans, byte_corpus,
                                                                                   in_process_trainers, capsys):
    straight, short, root = plans
    extended = extend(in_process_trainers, byte_corpus, root, "override", "--override-opt-param-scheduler")
    assert "learning-rate schedule from this run's flags (--override-opt_param-scheduler)" in capsys.readouterr().out
    assert sorted(extended) == list(range(1, 7))
    for iteration in (1, 2, 3):  # the lines from before the resume
        assert extended[iteration] == short[iteration]
    for iteration in (4, 5, 6):
        assert extended[iteration]["batch_sha1"] == straight[iteration]["batch_sha1"]
        assert extended[iteration]["lr"] == pytest.approx(cosine_lr(iteration - 1, 6), rel=1e-9)
        assert extended[iteration]["lr"] == pytest.approx(straight[iteration]["lr"], rel=1e-9)
    assert extended[4]["lr"] > 2 * MIN_LR  # not the decayed end of the 3-iteration schedule


@pytest.mark.slow  # trainings
def test_use_checkpoint_keeps_the_decayed_schedule(plans, byte_corpus, in_process_trainers):
    straight, _, root = plans
    extended = extend(in_process_trainers, byte_corpus, root, "checkpoint", "--use-checkpoint-opt_param-scheduler")
    for iteration in (4, 5, 6):  # past the checkpoint's 3 decay iterations: --min-lr
        assert extended[iteration]["batch_sha1"] == straight[iteration]["batch_sha1"]
        assert extended[iteration]["lr"] == pytest.approx(MIN_LR, rel=1e-9)


@pytest.mark.slow  # trainings
def test_extension_that_would_reshuffle_the_data_is_refused(in_process_trainers, tmp_path):
    """A corpus of about one and a half global batches' worth of samples per epoch: 3 iterations fit
    in one epoch, 6 need two, which Megatron-Core shuffles together (another order of the first)."""
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    jsonl = tmp_path / "small.jsonl"
    with open(jsonl, "w") as out:
        for i in range(24):
            out.write(json.dumps({"text": f"document {i}: " + "abcdefghij"[i % 10] * (20 + 3 * i)}) + "\n")
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=str(tmp_path / "small"),
                                tokenizer_type="ByteTokenizer", append_eod=True, workers=1))
    corpus, ckpt = str(tmp_path / "small_text_document"), tmp_path / "ckpt"
    argv = flags(corpus, 3, "--global-batch-size", "8", "--save", str(ckpt))
    argv[argv.index("--split") + 1] = "100,0,0"
    run(in_process_trainers, argv, tmp_path / "short.jsonl")
    extended = [a if a != "3" else "6" for a in argv] + ["--load", str(ckpt), "--override-opt_param-scheduler"]
    with pytest.raises(ConfigError, match=r"with --train-iters 6 the training data comes in another order than the "
                                          r"checkpoint's run \(--train-iters 3\)"):
        in_process_trainers(extended)
