"""``--eval-probe``: the trainer's own probe scores equal the offline probe's on the export.

A tiny LLaMA-3-style model trains two steps (one rank, in this process) on English text encoded
with a HF tokenizer, running the probe (the shipped natural-language specification, 3 candidates) at every iteration; it is exported
with ``export-hf`` and the offline probe (transformers, the prompt's KV cache shared by the
candidates: another code path than the trainer's one Megatron forward per candidate) scores the
export with the same specification and seed. The flag checks run in-process, before any model.
"""

from __future__ import annotations

import json

import pytest

from megatron_exact.eval.spec import DEFAULT_SPEC_PATH
from tests.training.conftest import REPO, read_metrics

HF_TOKENIZER = REPO / "tests" / "data" / "fixtures" / "hf_tokenizer"
LENGTH, DISTANCES, SAMPLES, SEED = 192, [4, 64], 2, 5


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    """The shipped natural-language specification with 3 candidates and no preamble (fewer, shorter forwards)."""
    record = json.loads(DEFAULT_SPEC_PATH.read_text())
    record.update(candidates=3, preamble="")
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps(record))
    return path


@pytest.fixture(scope="module")
def english_corpus(tmp_path_factory) -> str:
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    spec = json.loads(DEFAULT_SPEC_PATH.read_text())
    sentences = spec["filler"]["sentences"]
    root = tmp_path_factory.mktemp("english_corpus")
    jsonl = root / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(sentences[i:] + sentences[:i])}) + "\n"
                             for i in range(len(sentences))))
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=str(root / "data"),
                                tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(HF_TOKENIZER),
                                append_eod=True, workers=1))
    return str(root / "data_text_document")


def _flags(prefix: str, *extra: str) -> list[str]:
    return ["--model", "tiny-llama3", "--vocab-size", "512", "--seq-length", str(LENGTH), "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--data-path", prefix,
            "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--eval-interval", "1", *extra]


@pytest.mark.slow  # a training and an export
def test_trainer_probe_scores_equal_offline_probe_on_the_export(english_corpus, spec_file, in_process_trainers,
                                                                tmp_path):
    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.eval import probe
    from megatron_exact.eval.backend import HFModel
    from megatron_exact.eval.spec import load_spec

    metrics = tmp_path / "metrics.jsonl"
    trainer = in_process_trainers(_flags(
        english_corpus, "--eval-probe", str(spec_file), "--eval-probe-distances", *map(str, DISTANCES),
        "--eval-probe-samples", str(SAMPLES), "--eval-probe-seed", str(SEED), "--metrics-file", str(metrics),
        "--save", str(tmp_path / "ckpt")))
    trainer.train()
    trainer.close()
    logged = [r for r in read_metrics(metrics) if r.get("split") == "eval_probe"]
    assert [r["iteration"] for r in logged] == [1, 2]  # every --eval-interval; the end is iteration 2
    assert all(len(r["cells"]) == len(DISTANCES) for r in logged)

    model = HFModel(export_hf(tmp_path / "ckpt", tmp_path / "hf"), dtype="float32")
    samples = probe.distance_sweep(load_spec(spec_file), model, length=LENGTH, distances=DISTANCES,
                                   num_samples=SAMPLES, seed=SEED)
    offline = probe.summarize(probe.score_samples(model, samples))
    assert len(offline) == len(DISTANCES)
    margins_differ = False
    for ours, theirs in zip(logged[-1]["cells"], offline):
        assert (ours["distance"], ours["length"], ours["n"]) == (theirs["distance"], theirs["length"], theirs["n"])
        for variant in ("present", "ablated"):
            assert ours[f"accuracy_{variant}"] == theirs[f"accuracy_{variant}"]
            assert ours[f"margin_{variant}"] == pytest.approx(theirs[f"margin_{variant}"], abs=1e-4)
            margins_differ |= ours[f"margin_{variant}"] != logged[0]["cells"][0][f"margin_{variant}"]
    assert margins_differ, "training changed nothing the probe sees: the comparison would prove little"


@pytest.mark.parametrize("extra, message", [
    (["--eval-probe", "missing_spec.json"], "task specification missing_spec.json: no such file"),
    (["--eval-probe", "BAD"], "not valid JSON (line 1"),
    (["--eval-probe", "SPEC", "--eval-probe-distances", "150"], "--eval-probe-distances/--eval-probe-length"),
    (["--eval-probe", "SPEC", "--eval-probe-length", "400"], "--eval-probe-length 400: must be in [1, --seq-length"),
    (["--eval-probe", "SPEC", "--eval-probe-samples", "0"], "--eval-probe-samples must be positive"),
    (["--eval-probe", "SPEC", "--eval-probe-distances", "-3"], "--eval-probe-distances -3: must be >= 0"),
])
def test_eval_probe_flags_are_checked_at_start_up(english_corpus, spec_file, tmp_path, extra, message):
    from megatron_exact.training.arguments import ConfigError, parse_args, validate_args

    bad = tmp_path / "bad_spec.json"
    bad.write_text("{not json")
    extra = [{"SPEC": str(spec_file), "BAD": str(bad)}.get(e, e) for e in extra]
    with pytest.raises(ConfigError) as raised:
        validate_args(parse_args(_flags(english_corpus, *extra)), world_size=1)
    assert message in str(raised.value)
    if "BAD" in extra or str(bad) in extra:
        assert str(bad) in str(raised.value)


def test_probe_samples_are_built_once(english_corpus, spec_file):
    """validate_args builds the samples (checking the flags); the trainer's call gets that same list."""
    from megatron_exact.training.arguments import parse_args, validate_args
    from megatron_exact.training.eval_probe import build_probe_samples

    args = parse_args(_flags(english_corpus, "--eval-probe", str(spec_file), "--eval-probe-samples", "1"))
    arch, _, tokenizer = validate_args(args, world_size=1)
    samples = build_probe_samples(args, tokenizer, arch.vocab_size)
    assert samples and build_probe_samples(args, tokenizer, arch.vocab_size) is samples
    args.eval_probe_seed += 1  # other inputs: built anew
    assert build_probe_samples(args, tokenizer, arch.vocab_size) is not samples


@pytest.mark.parametrize("size", [2, 3])
def test_probe_split_over_data_parallel_replicas_equals_one_replica(english_corpus, spec_file, size):
    """Replica r scores samples[r::size]; gathered, the records are one replica's, in order (so the
    logged cells equal the offline probe's whatever the data-parallel size)."""
    import torch

    from megatron_exact.eval.probe import summarize
    from megatron_exact.training.arguments import parse_args, validate_args
    from megatron_exact.training.eval_probe import build_probe_samples, run_probe

    args = parse_args(_flags(english_corpus, "--eval-probe", str(spec_file), "--eval-probe-distances", "4", "64",
                             "--eval-probe-samples", "3"))
    arch, _, tokenizer = validate_args(args, world_size=1)
    samples = build_probe_samples(args, tokenizer, arch.vocab_size)
    table = torch.randn(arch.vocab_size, arch.vocab_size, generator=torch.Generator().manual_seed(0))

    def logits_fn(tokens, last):  # a deterministic stand-in for the model
        return (table[tokens[0, -last:]] + 1e-3 * tokens.shape[1]).unsqueeze(0)

    alone = run_probe(samples, logits_fn)
    for rank in range(size):
        def all_gather(mine, rank=rank):
            return [mine if other == rank else run_probe(samples[other::size], logits_fn) for other in range(size)]

        assert len(run_probe(samples[rank::size], logits_fn)) < len(samples)
        split = run_probe(samples, logits_fn, rank=rank, size=size, all_gather=all_gather)
        assert split == alone and summarize(split) == summarize(alone)
