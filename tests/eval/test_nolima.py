"""NoLiMa-style needles: no literal overlap between question and needle (shipped set), placement at depth,
fitting to length, the loader for NoLiMa's own needle-set layout, and malformed needle sets."""

import json

import pytest

from megatron_exact.eval import nolima
from megatron_exact.eval.cli import main
from megatron_exact.errors import BadInputError
from megatron_exact.eval.probe import TokenizerCodec


@pytest.fixture(scope="module")
def codec(tokenizer):
    return TokenizerCodec(tokenizer)


def test_shipped_questions_share_no_content_word_with_their_needles():
    needle_set = nolima.load_needle_set()
    assert len(needle_set.items) >= 20
    for item in needle_set.items:
        for character in item.characters:
            needle = item.needle.replace("{CHAR}", character)
            shared = nolima.content_words(item.question) & nolima.content_words(needle)
            assert not shared, (item.entry_id, item.test_id, shared)
        assert "{CHAR}" in item.needle and "{" not in item.question


def test_needle_placed_at_depth_and_fitted(codec):
    needle_set = nolima.load_needle_set()
    haystack = nolima.default_haystack()
    samples = nolima.generate_samples(needle_set, codec, haystack, lengths=[384, 512], depths=[0, 50, 100],
                                      num_samples=2, seed=1)
    assert len(samples) == 2 * 2 * 3 and len({(s.length, s.index) for s in samples}) == len(samples)
    for sample in samples:
        needle, (character,) = sample.metadata["needle"], sample.references
        assert character in needle and sample.prompt.count(needle) == 1 and sample.prompt.count(character) == 1
        assert sample.prompt.endswith(f"Question: {sample.metadata['question']}\nAnswer:")
        assert len(sample.prompt_ids) + sample.max_new_tokens <= sample.length
        body = sample.prompt.split("\n\n")[1]
        if sample.metadata["depth"] == 0:
            assert body.startswith(needle)
        elif sample.metadata["depth"] == 100:
            assert body.endswith(needle)
        else:
            assert not body.startswith(needle) and not body.endswith(needle)
    again = nolima.generate_samples(needle_set, codec, haystack, lengths=[384, 512], depths=[0, 50, 100],
                                    num_samples=2, seed=1)
    assert [s.prompt for s in again] == [s.prompt for s in samples]


def _nolima_dir(tmp_path, entries):
    (tmp_path / "needlesets").mkdir(parents=True)
    (tmp_path / "haystack" / "rand_shuffle").mkdir(parents=True)
    (tmp_path / "needlesets" / "needle_set.json").write_text(json.dumps(entries))
    book = " ".join(f"Chapter line {i} describes a ship that sails toward the northern harbour." for i in range(60))
    (tmp_path / "haystack" / "rand_shuffle" / "rand_book_1.txt").write_text(book)
    return tmp_path


NOLIMA_ENTRY = {
    "id": "0401", "reasoning_type": "world_knowledge", "system_prompt": "",
    "needle": "Actually, {CHAR} lives next to {1}.",
    "questions": {"onehop": "Which character has been to {2}?", "twohop": "Which character has been to {3}?"},
    "character_set": ["Yuki", "Stuart"],
    "tests": {"T17_C02": {"input_args": ["the Kiasma museum", "Helsinki", "Uusimaa"]},
              "T15_C02": {"input_args": ["the European Central Bank", "Frankfurt", "Germany"]}},
}


def test_loader_reads_nolimas_layout(tmp_path, codec):
    root = _nolima_dir(tmp_path, [NOLIMA_ENTRY])
    needle_set = nolima.load_needle_set(root)
    assert needle_set.name == "needle_set"
    assert sorted((i.test_id, i.question_type, i.question) for i in needle_set.items) == [
        ("T15_C02", "onehop", "Which character has been to Frankfurt?"),
        ("T15_C02", "twohop", "Which character has been to Germany?"),
        ("T17_C02", "onehop", "Which character has been to Helsinki?"),
        ("T17_C02", "twohop", "Which character has been to Uusimaa?"),
    ]
    assert {i.needle for i in needle_set.items} == {"Actually, {CHAR} lives next to the Kiasma museum.",
                                                    "Actually, {CHAR} lives next to the European Central Bank."}
    haystack = nolima.default_haystack(root)
    assert haystack.startswith("Chapter line 0")
    (sample,) = nolima.generate_samples(needle_set, codec, haystack, lengths=[300], depths=[50], num_samples=1)
    assert "northern harbour" in sample.prompt and sample.references[0] in ("Yuki", "Stuart")


@pytest.mark.parametrize("entries, message", [
    ({"not": "a list"}, "top level must be a non-empty JSON list"),
    ([{**NOLIMA_ENTRY, "needle": None}], r"entry '0401': field 'needle' missing"),
    ([{**NOLIMA_ENTRY, "needle": "{CHAR} lives next to {4}."}], "placeholder beyond its 3 input_args"),
    ([{**NOLIMA_ENTRY, "needle": "Someone lives next to {1}."}], r"must contain \{CHAR\}"),
    ([{**NOLIMA_ENTRY, "tests": {"T1": {"input_args": "Helsinki"}}}], "test 'T1': 'input_args' must be a list"),
    ([{**NOLIMA_ENTRY, "task_template": "Text: {context}"}], "must use exactly {haystack} and {question}"),
])
def test_malformed_needle_sets_name_file_and_entry(tmp_path, entries, message):
    root = _nolima_dir(tmp_path, entries)
    with pytest.raises(BadInputError, match=message) as err:
        nolima.load_needle_set(root)
    assert "needle_set.json" in str(err.value)


def test_missing_nolima_data_is_explained(tmp_path):
    with pytest.raises(BadInputError, match="not a directory"):
        nolima.load_needle_set(tmp_path / "absent")
    with pytest.raises(BadInputError, match="no needlesets/needle_set.json"):
        nolima.load_needle_set(tmp_path)
    root = _nolima_dir(tmp_path / "data", [NOLIMA_ENTRY])
    (root / "needlesets" / "needle_set.json").rename(root / "needlesets" / "needle_set_hard.json")
    with pytest.raises(BadInputError, match="found needle_set_hard.json; choose with --needle-set"):
        nolima.load_needle_set(root)
    (root / "needlesets" / "broken.json").write_text("[{\n")
    with pytest.raises(BadInputError, match=r"broken.json: not valid JSON \(line 2"):
        nolima.load_needle_set(root, "broken.json")


def test_nolima_suite_end_to_end(eval_models, tmp_path):
    out = tmp_path / "out"
    assert main(["nolima", "--model", str(eval_models["a"]), "--lengths", "320", "--depths", "50",
                 "--num-samples", "2", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    records = results["models"]["A"]["samples"]
    assert len(records) == 2 and all(r["metric"] == "contains" for r in records)
    assert (out / "nolima_scores.png").is_file()
    (row,) = [l for l in (out / "table.md").read_text().splitlines() if l.startswith("| nolima_needles")]
    expected = 100 * sum(r["score"] for r in records) / 2
    assert float(row.split("|")[3]) == pytest.approx(expected, abs=0.006)
