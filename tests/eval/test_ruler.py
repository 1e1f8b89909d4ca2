"""RULER-style generators: fitted to each length with the tokenizer (within one haystack unit), needle
presence/count/placement, determinism, specification-language tasks, essay haystacks; RULER's scoring."""

import re
from collections import Counter

import pytest

from megatron_exact.eval import metrics, ruler
from megatron_exact.errors import BadInputError
from megatron_exact.eval.probe import TokenizerCodec
from megatron_exact.eval.spec import parse_spec

ESSAY = " ".join(
    f"Essay sentence number {i} talks about {w} and how people think about it when they work." for i, w in
    enumerate(["startups", "cities", "painting", "writing", "cooking", "rivers", "teaching", "maps"] * 40))


@pytest.fixture(scope="module")
def codec(tokenizer):
    return TokenizerCodec(tokenizer)


def _fits(codec, task, sample, **kwargs):
    """prompt + budget <= length, and one more haystack unit would not fit."""
    assert len(sample.prompt_ids) + sample.max_new_tokens <= sample.length
    assert sample.prompt_ids == codec.bos + codec.encode(sample.prompt)
    units = sample.metadata["haystack_units"]
    bigger = ruler.rebuild(task, codec, length=sample.length, index=sample.index, units=units + 1, **kwargs)
    assert len(codec.bos) + len(codec.encode(bigger)) + sample.max_new_tokens > sample.length


@pytest.mark.parametrize("task, lengths", [
    ("niah_single_1", [1024, 2048]), ("niah_multikey_2", [1024, 2048]), ("niah_multikey_3", [1024]),
    ("vt", [1024, 2048]), ("cwe", [2048]), ("fwe", [1024, 2048]),
])
def test_prompts_fill_each_length_within_one_haystack_unit(codec, task, lengths):
    for length in lengths:
        samples = ruler.generate_samples(task, codec, length=length, num_samples=2, seed=5)
        assert [s.index for s in samples] == [0, 1]
        for sample in samples:
            assert sample.max_new_tokens == ruler.TOKENS_TO_GENERATE[ruler.task_family(task)]
            _fits(codec, task, sample, seed=5)


def test_generators_are_deterministic_by_seed(codec):
    for task in ruler.DEFAULT_TASKS:
        length = 2048 if task == "cwe" else 1024
        first = [s.prompt for s in ruler.generate_samples(task, codec, length=length, num_samples=2, seed=1)]
        again = [s.prompt for s in ruler.generate_samples(task, codec, length=length, num_samples=2, seed=1)]
        other = [s.prompt for s in ruler.generate_samples(task, codec, length=length, num_samples=2, seed=2)]
        assert first == again and first != other and first[0] != first[1]


def test_niah_needles_as_the_template_says(codec):
    (single,) = ruler.generate_samples("niah_single_1", codec, length=1024, num_samples=1)
    (value,) = single.references
    assert re.fullmatch(r"\d{7}", value)
    needle = f"One of the special magic numbers for {single.metadata['queries'][0]} is: {value}."
    assert single.prompt.count("One of the special magic numbers for") == 1
    assert single.prompt.count(needle) == 1 and single.prompt.count(value) == 1
    assert single.prompt.count(ruler.NOISE) == single.metadata["haystack_units"]
    # Singular template: "A special magic number is hidden ... What is the special magic number for K ..."
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith(f"The special magic number for {single.metadata['queries'][0]} mentioned in the "
                                  "provided text is")

    (multi,) = ruler.generate_samples("niah_multikey_2", codec, length=1024, num_samples=1)
    lines = multi.prompt.split("\n")
    needles = [line for line in lines if line.startswith("One of the special magic numbers for ")]
    assert len(needles) == multi.metadata["haystack_units"] + 1  # the haystack is needles, plus the real one
    key = multi.metadata["queries"][0]
    assert [n for n in needles if f" for {key} is:" in n] == [f"One of the special magic numbers for {key} is: "
                                                                f"{multi.references[0]}."]

    (uuids,) = ruler.generate_samples("niah_multikey_3", codec, length=1024, num_samples=1)
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid_re, uuids.references[0]) and re.fullmatch(uuid_re, uuids.metadata["queries"][0])
    assert uuids.prompt.count(f"for {uuids.metadata['queries'][0]} is: {uuids.references[0]}.") == 1
    assert "special magic uuid for" in uuids.prompt


def test_vt_chain_and_one_shot_example(codec):
    (sample,) = ruler.generate_samples("vt", codec, length=1024, num_samples=1)
    names, chain = sample.references, sample.metadata["chain"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = chain[0].split("= ")[1]
    assert chain[0] == f"VAR {names[0]} = {value}"
    assert chain[1:] == [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(4)]
    question = sample.prompt.rindex("Memorize and track")
    example, task = sample.prompt[:question], sample.prompt[question:]
    positions = [task.index(line.strip()) for line in chain]
    assert positions == sorted(positions)  # the chain appears in order
    assert "VAR" in example and "they are: " in example and example.count("Memorize and track") == 1
    assert task.endswith(f"5 variables are assigned the value {value}, they are: ")


def test_cwe_and_fwe_answers_are_the_most_frequent_words(codec):
    (cwe,) = ruler.generate_samples("cwe", codec, length=2048, num_samples=1)
    main_list = cwe.prompt.rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. (\S+)", main_list))
    assert sorted(counts[w] for w in cwe.references) == [6] * 10  # below 4K tokens: 6 repeats, others 1
    assert sorted(set(counts.values())) == [1, 6] and len(cwe.references) == 10

    (fwe,) = ruler.generate_samples("fwe", codec, length=2048, num_samples=1)
    coded = fwe.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    ranked = [w for w, _ in Counter(coded).most_common()]
    assert ranked[0] == "..." and set(ranked[1:4]) == set(fwe.references)


def test_specification_language_tasks(codec):
    words = [f"w{i}" for i in range(3, 200)]
    spec = parse_spec({
        "format": "megatron_exact.probe_spec", "version": 1, "name": "synthetic",
        "fact": "w3 {key} w4 {answer} w5", "question": "w6 {key} w4", "keys": words[10:40], "answers": words[40:50],
        "filler": {"type": "words", "words": words[60:], "sentence_length": [3, 6], "sentence_end": ""},
        "variable_tracking": {"variables": words[150:170], "assign": "w7 {variable} w8 {value}",
                              "alias": "w7 {variable} w8 w9 {source}", "instruction": "w10",
                              "question": "w11 {value}", "answer_prefix": "w12"},
    }, "synthetic")
    allowed = set(words)
    for task in ruler.SPEC_TASKS:
        (sample,) = ruler.generate_samples(task, codec, length=512, num_samples=1, spec=spec)
        assert set(sample.prompt.split()) <= allowed, task  # nothing of the English templates
        assert all(r in sample.prompt.split() for r in sample.references)
        _fits(codec, task, sample, spec=spec)
    (kv,) = ruler.generate_samples("niah_multikey_2", codec, length=512, num_samples=1, spec=spec)
    key = kv.metadata["queries"][0]
    assert kv.prompt.count(f"w3 {key} w4") == 1 and kv.prompt.endswith(f"w6 {key} w4")
    with pytest.raises(BadInputError, match="not expressible in a task specification"):
        ruler.generate_samples("cwe", codec, length=2048, num_samples=1, spec=spec)


def test_essay_haystack_from_the_users_text(codec):
    (sample,) = ruler.generate_samples("niah_single_2", codec, length=1024, num_samples=1, haystack_text=ESSAY)
    assert sample.prompt.count("One of the special magic numbers for") == 1
    assert "Essay sentence number 0 talks about startups" in sample.prompt
    _fits(codec, "niah_single_2", sample, haystack_text=ESSAY)
    (multi,) = ruler.generate_samples("niah_multikey_1", codec, length=1024, num_samples=1, haystack_text=ESSAY)
    assert multi.prompt.count("One of the special magic numbers for") == 4 and len(multi.references) == 1
    with pytest.raises(BadInputError, match="need --haystack-file"):
        ruler.check_tasks(["niah_single_2"], spec=None, haystack_text=None)


def test_unknown_task_and_too_short_length(codec):
    with pytest.raises(BadInputError, match="unknown task.*niah_single_9.*known: niah_single_1"):
        ruler.check_tasks(["niah_single_9"], spec=None, haystack_text=None)
    with pytest.raises(BadInputError, match="--lengths 200: too short for cwe"):
        ruler.generate_samples("cwe", codec, length=200, num_samples=1)


def test_ruler_scoring_on_hand_made_predictions():
    refs = ["1234567", "7654321", "ABC-def"]
    assert metrics.score("string_match_all", "1234567, 7654321 and abc-DEF", refs) == 1.0
    assert metrics.score("string_match_all", "The answer is 1234567.", refs) == pytest.approx(1 / 3)
    assert metrics.score("string_match_part", "The answer is 1234567.", refs) == 1.0
    assert metrics.score("string_match_all", "nothing here", refs) == 0.0
    assert metrics.score("string_match_part", "nothing here", refs) == 0.0
    # case-insensitive, surrounding whitespace ignored
    assert metrics.score("string_match_all", "  \n\tabc-def  \n", ["ABC-DEF"]) == 1.0
    # control characters become newlines (so they split a value), as RULER post-processes
    assert metrics.postprocess_prediction(" 123\x004567 \x1f") == "123\n4567"
    assert metrics.score("string_match_all", "123\x004567", ["1234567"]) == 0.0
    # inner whitespace is not normalised: "12 34567" does not contain "1234567"
    assert metrics.score("string_match_part", "12 34567", ["1234567"]) == 0.0
    assert metrics.score("contains", "It is Yuki.", ["yuki"]) == 1.0
