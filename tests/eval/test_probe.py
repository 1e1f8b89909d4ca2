"""The distance-resolved probe: evidence placement checked by tokenizing, ablation, teacher-forced scoring
against transformers' own loss, determinism, the mirror sweep, and task-specification errors."""

import json
import random

import pytest
import torch

from megatron_exact.eval import probe
from megatron_exact.eval.backend import ForwardScorer, HFModel
from megatron_exact.errors import BadInputError
from megatron_exact.eval.spec import default_spec, load_spec, parse_spec, write_spec


def _find(haystack, needle):
    """Every start index of ``needle`` in ``haystack`` (token lists)."""
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


@pytest.fixture(scope="module")
def model(eval_models):
    return HFModel(eval_models["a"])


@pytest.fixture(scope="module")
def codec(tokenizer):
    return probe.TokenizerCodec(tokenizer)


def test_evidence_at_the_requested_token_distance(codec, tokenizer):
    spec = default_spec()
    length = 600
    for sample in probe.distance_sweep(spec, codec, length=length, distances=[0, 1, 37, 128, 300], num_samples=3):
        # The prompt is what the tokenizer makes of its own text (no odd token boundaries) ...
        text = tokenizer.decode(sample.present, skip_special_tokens=True)
        assert tokenizer.encode(text) == sample.present
        # ... the fact (tokenized on its own) occurs once, and `distance` tokens separate it from the question.
        fact = tokenizer.encode(" " + spec.render_fact(sample.key, sample.answer), add_special_tokens=False)
        question = tokenizer.encode(" " + spec.render_question(sample.key), add_special_tokens=False)
        assert _find(sample.present, fact) == [sample.fact_span[0]]
        assert sample.fact_span[1] - sample.fact_span[0] == len(fact)
        (question_start,) = _find(sample.present, question)
        assert question_start - sample.fact_span[1] == sample.distance
        assert question_start + len(question) == len(sample.present)
        assert len(sample.present) + max(len(c) for c in sample.candidate_ids) == length
        # The ablated prompt is the same tokens without the fact, and the answer only ever occurs in the fact.
        start, end = sample.fact_span
        assert sample.ablated == sample.present[:start] + sample.present[end:]
        assert text.count(sample.answer) == 1
        assert sample.answer not in tokenizer.decode(sample.ablated)
        assert sample.answer in sample.candidates and sample.candidates[sample.answer_index] == sample.answer
        assert len(sample.candidates) == spec.num_candidates == len(set(sample.candidates))


def test_samples_are_deterministic_and_controlled(codec):
    spec = default_spec()
    first = probe.distance_sweep(spec, codec, length=400, distances=[16, 64], num_samples=4, seed=3)
    again = probe.distance_sweep(spec, codec, length=400, distances=[16, 64], num_samples=4, seed=3)
    other = probe.distance_sweep(spec, codec, length=400, distances=[16, 64], num_samples=4, seed=4)
    assert [s.present for s in first] == [s.present for s in again]
    assert [s.present for s in first] != [s.present for s in other]
    # One index shows the same fact at every distance (only its position moves).
    by_index = {}
    for s in first:
        by_index.setdefault(s.index, set()).add((s.key, s.answer, tuple(s.candidates)))
    assert all(len(v) == 1 for v in by_index.values())


def test_mirror_sweep_varies_the_length_at_a_fixed_distance(codec):
    samples = probe.length_sweep(default_spec(), codec, distance=48, lengths=[256, 512, 1024], num_samples=2)
    assert sorted({(s.length, s.distance, s.sweep) for s in samples}) == [
        (256, 48, "length"), (512, 48, "length"), (1024, 48, "length")]
    for s in samples:
        assert s.question_start - s.fact_span[1] == 48
        assert len(s.present) + max(map(len, s.candidate_ids)) == s.length


def test_a_distance_that_does_not_fit_is_refused(codec):
    with pytest.raises(BadInputError, match="distance 500 does not fit in length 300"):
        probe.build_sample(default_spec(), codec, length=300, distance=500, index=0)


def _transformers_logprob(hf_model, prompt, candidate):
    """log p(candidate | prompt) from transformers' own loss (mean CE over the candidate's labels)."""
    ids = torch.tensor([prompt + candidate])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt):] = torch.tensor(candidate)
    with torch.no_grad():
        loss = hf_model(input_ids=ids, labels=labels).loss
    return -loss.item() * len(candidate)


def test_candidate_scores_equal_transformers_loss(model, codec):
    spec = default_spec()
    samples = probe.distance_sweep(spec, codec, length=256, distances=[20], num_samples=2)
    multi_token = [c for s in samples for c in s.candidate_ids if len(c) > 1]
    assert multi_token, "the test needs candidates of several tokens (the cached-prefix path)"
    slow = ForwardScorer(model.logits)
    for sample in samples:
        for prompt in (sample.present, sample.ablated):
            cached = model.score_candidates(prompt, sample.candidate_ids)
            per_candidate = slow.score_candidates(prompt, sample.candidate_ids)
            reference = [_transformers_logprob(model.model, prompt, c) for c in sample.candidate_ids]
            torch.testing.assert_close(torch.tensor(cached), torch.tensor(reference), atol=2e-4, rtol=1e-5)
            torch.testing.assert_close(torch.tensor(per_candidate), torch.tensor(reference), atol=2e-4, rtol=1e-5)


def test_a_repeated_prompt_is_scored_once_with_the_same_records(model, codec):
    """A sweep's ablated prompts repeat across its distances; each distinct prompt is scored once,
    and the records equal scoring every prompt on its own."""
    samples = probe.distance_sweep(default_spec(), codec, length=256, distances=[20, 60, 100], num_samples=2)

    class Counting(ForwardScorer):
        prompts = []

        def score_prompts(self, items, done=None):
            Counting.prompts += [tuple(prompt) for prompt, _ in items]
            return model.score_prompts(items, done)

    finished = []
    records = probe.score_samples(Counting(model.logits), samples, progress=finished.append)
    distinct = {tuple(p) for s in samples for p in (s.present, s.ablated)}
    assert len(Counting.prompts) == len(set(Counting.prompts)) == len(distinct) < 2 * len(samples)
    assert finished == [1] * len(samples)
    for sample, record in zip(samples, records):
        for variant, prompt in (("present", sample.present), ("ablated", sample.ablated)):
            alone = model.score_candidates(prompt, sample.candidate_ids)
            torch.testing.assert_close(record[variant]["logprobs"], alone, atol=1e-5, rtol=0)
            assert (record[variant]["correct"], record[variant]["margin"]) == probe.rank_scores(
                record[variant]["logprobs"], sample.answer_index)


def _prefill_lengths(hf_model):
    """Records the tokens each prefill forward (the calls asking for the last position's logits only) runs."""
    lengths = []

    def hook(module, args, kwargs):
        if kwargs.get("logits_to_keep") == 1:
            lengths.append(kwargs["input_ids"].shape[1])

    return lengths, hf_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_prefix_reuse_runs_only_the_unshared_tokens_with_the_same_scores(eval_models, codec):
    """Prompts scored together reuse the KV cache of the prefix they share: a present prompt after
    its ablated one runs only from the fact on; the scores equal prefilling every prompt from its
    first token, and transformers' own loss."""
    spec = default_spec()
    sample = probe.build_sample(spec, codec, length=400, distance=60, index=0)
    items = [(sample.ablated, sample.candidate_ids), (sample.present, sample.candidate_ids)]
    shared = next(i for i, (a, b) in enumerate(zip(sample.ablated, sample.present)) if a != b)
    assert shared >= sample.fact_span[0]  # everything before the fact
    reusing, fresh = HFModel(eval_models["a"]), HFModel(eval_models["a"], prefix_reuse=False)
    lengths, handle = _prefill_lengths(reusing.model)
    try:
        scores = reusing.score_prompts(items)
    finally:
        handle.remove()
    first, second = sorted([sample.ablated, sample.present])
    assert lengths == [len(first), len(second) - shared]
    reference = fresh.score_prompts(items)
    for got, want, (prompt, _) in zip(scores, reference, items):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        loss = [_transformers_logprob(fresh.model, prompt, c) for c in sample.candidate_ids]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(loss), atol=2e-4, rtol=1e-5)


def test_accuracy_margin_and_summary_by_hand():
    assert probe.rank_scores([-1.0, -2.0, -0.5], 2) == (True, 0.5)
    assert probe.rank_scores([-1.0, -2.0, -0.5], 0) == (False, -0.5)
    assert probe.rank_scores([-1.0, -1.0], 0) == (False, 0.0)  # a tie is not a correct ranking

    def record(distance, present, ablated):
        return {"sweep": "distance", "length": 100, "distance": distance,
                "present": {"correct": present[0], "margin": present[1]},
                "ablated": {"correct": ablated[0], "margin": ablated[1]}}

    table = probe.summarize([record(8, (True, 2.0), (False, -1.0)), record(8, (False, -1.0), (False, -3.0)),
                             record(32, (True, 0.5), (True, 0.25))])
    assert table == [
        {"sweep": "distance", "length": 100, "distance": 8, "n": 2, "accuracy_present": 0.5, "margin_present": 0.5,
         "accuracy_ablated": 0.0, "margin_ablated": -2.0},
        {"sweep": "distance", "length": 100, "distance": 32, "n": 1, "accuracy_present": 1.0,
         "margin_present": 0.5, "accuracy_ablated": 1.0, "margin_ablated": 0.25},
    ]


def test_a_synthetic_language_spec_round_trips_and_probes(tmp_path):
    """A word-level synthetic language (the kind a tiny model is trained on) exports its own spec."""
    from tests.convert.tiny_hf_models import save_tokenizer
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok")
    words = [f"w{i}" for i in range(3, 200)]
    record = {
        "format": "megatron_exact.probe_spec", "version": 1, "name": "synthetic",
        "fact": "w3 {key} w4 {answer} w5", "question": "w6 {key} w4", "keys": words[10:40],
        "answers": words[40:50], "candidates": 4,
        "filler": {"type": "words", "words": words[60:], "sentence_length": [3, 6], "sentence_end": ""},
    }
    spec = parse_spec(record, "synthetic")
    path = write_spec(tmp_path / "synthetic_spec.json", spec)
    loaded = load_spec(path)
    assert loaded.as_json() == spec.as_json()
    codec = probe.TokenizerCodec(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    sample = probe.build_sample(loaded, codec, length=200, distance=50, index=0)
    assert sample.question_start - sample.fact_span[1] == 50
    assert len(sample.present) + 1 == 200 and all(len(c) == 1 for c in sample.candidate_ids)
    assert 0 not in sample.present  # no unknown tokens: the prompt is in the tokenizer's language


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("fact"), "missing field 'fact'"),
    (lambda r: r.update(fact="{key} keeps it somewhere."), r"field 'fact' must contain \{answer\}"),
    (lambda r: r.update(question="Where does {name} keep it?"), r"unknown placeholder\(s\) \['name'\]"),
    (lambda r: r.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda r: r.update(answers=["kitchen"]), "needs at least 2 entries"),
    (lambda r: r.update(candidates=99), "'candidates' must be an integer"),
    (lambda r: r["filler"]["sentences"].append("The kitchen is warm."), r"filler contains key\(s\)/answer\(s\)"),
    (lambda r: r.update(format="something-else"), "field 'format' must be"),
])
def test_malformed_specs_name_file_and_field(tmp_path, change, message):
    record = default_spec().as_json()
    change(record)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(record))
    with pytest.raises(BadInputError, match=message) as err:
        load_spec(path)
    assert str(path) in str(err.value)


def test_spec_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "format": "megatron_exact.probe_spec",\n  "version": 1,,\n}\n')
    with pytest.raises(BadInputError, match=r"broken.json: not valid JSON \(line 3"):
        load_spec(path)
    with pytest.raises(BadInputError, match="no such file"):
        load_spec(tmp_path / "missing.json")


def _markov_record(**filler_changes):
    words = [f"w{i}" for i in range(6)]
    filler = {"type": "markov", "words": words, "sentence_length": [20, 20], "sentence_end": "",
              "successors": [[(i + 1) % 6, (i + 2) % 6] for i in range(6)], "weights": [3, 1],
              "jump_probability": 0.0}
    filler.update(filler_changes)
    return {"format": "megatron_exact.probe_spec", "version": 1, "name": "chain", "fact": "K {key} {answer}",
            "question": "Q {key}", "keys": ["k0", "k1"], "answers": ["v0", "v1"], "filler": filler}


def test_markov_filler_follows_its_chain_and_round_trips(tmp_path):
    """A 'markov' filler walks its successor table (the synthetic corpus's filler); specs written
    before it existed ('words', 'sentences') still load unchanged."""
    spec = parse_spec(_markov_record(), "chain")
    assert load_spec(write_spec(tmp_path / "chain.json", spec)).as_json() == spec.as_json()
    rng = random.Random(0)
    for _ in range(20):
        indices = [int(w[1:]) for w in spec.filler.sentence(rng).split()]
        assert len(indices) == 20
        assert all(b - a in (1, 2, -5, -4) for a, b in zip(indices, indices[1:]))
    # jump_probability 1: every step is a uniform draw, so non-successors occur.
    jumping = parse_spec(_markov_record(jump_probability=1.0), "chain").filler
    steps = [(int(a[1:]), int(b[1:])) for s in (jumping.sentence(rng) for _ in range(20))
             for a, b in zip(s.split(), s.split()[1:])]
    assert any((b - a) % 6 not in (1, 2) for a, b in steps)
    old = parse_spec({**_markov_record(), "filler": {"type": "words", "words": ["w0", "w1"]}}, "old")
    assert old.filler.as_json() == {"type": "words", "words": ["w0", "w1"], "sentence_length": [5, 12],
                                    "sentence_end": "."}


@pytest.mark.parametrize("change, message", [
    ({"successors": [[1, 2]] * 5}, "one row per word"),
    ({"successors": [[1, 9]] * 6}, r"'successors'\[0\] must list 2 word indices"),
    ({"weights": []}, "'weights' must be a non-empty list"),
    ({"jump_probability": 2}, r"'jump_probability' must be a number in \[0, 1\]"),
    ({"order": 2}, r"filler of type 'markov' has unknown field\(s\) \['order'\]"),
])
def test_malformed_markov_filler_names_the_field(change, message):
    with pytest.raises(BadInputError, match=message):
        parse_spec(_markov_record(**change), "chain")
