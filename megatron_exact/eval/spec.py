"""Task specifications: the language a probe (and the spec-driven RULER-style tasks) is written in.

A specification is a JSON file::

    {
      "format": "megatron_exact.probe_spec", "version": 1,
      "name": "natural-language",
      "preamble": "Read the notes below ...",          # optional, may be ""
      "fact": "{key} keeps the spare key in the {answer}.",
      "question": "Where does {key} keep the spare key? In the",
      "keys": ["Alice", ...], "answers": ["kitchen", ...],
      "candidates": 8,                                  # answers scored per sample (default: all)
      "separator": " ",                                 # joins preamble, filler, fact and question
      "answer_separator": " ",                          # goes before a scored or generated answer
      "filler": {"type": "sentences", "sentences": [...]}
             or {"type": "words", "words": [...], "sentence_length": [5, 12], "sentence_end": "."}
             or {"type": "markov", "words": [...], "successors": [[3, 17, 5], ...], "weights": [4, 2, 1],
                 "jump_probability": 0.05, "sentence_length": [8, 16], "sentence_end": ""},
      "variable_tracking": {                            # optional: the vt task in this language
        "variables": ["XKQJD", ...],
        "assign": "VAR {variable} = {value}.", "alias": "VAR {variable} = VAR {source}.",
        "instruction": "...", "question": "... {value} ...", "answer_prefix": "..."
      }
    }

The shipped default (:func:`default_spec`, ``megatron_exact/eval/data/natural_language_spec.json``)
is English for real models. A synthetic corpus exports its own with :func:`write_spec`, so
a tiny model trained on that corpus is probed in the language it learnt.

A ``markov`` filler is a first-order chain over ``words``: ``successors[i]`` lists the
indices of the words that may follow word ``i``, drawn with the relative ``weights``
(one per successor), except that with ``jump_probability`` the next word is drawn uniformly;
each sentence starts at a uniformly drawn word. It lets a probe's filler match a corpus
whose filler is such a chain (the synthetic corpus's), so that the probe's filler is as
predictable as the text the model was trained on.

Filler never contains a key or an answer (checked when the specification is loaded): a
model that finds the answer must have found it in the fact.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Optional, Union

from megatron_exact import atomic_io
from megatron_exact.errors import BadInputError

SPEC_FORMAT = "megatron_exact.probe_spec"
SPEC_VERSION = 1
DEFAULT_SPEC_PATH = Path(__file__).with_name("data") / "natural_language_spec.json"

_TOP_FIELDS = {"format", "version", "name", "description", "preamble", "fact", "question", "keys", "answers",
               "candidates", "separator", "answer_separator", "filler", "variable_tracking"}
_VT_FIELDS = {"variables", "assign", "alias", "instruction", "question", "answer_prefix"}


@dataclasses.dataclass(frozen=True)
class Filler:
    """Generates filler sentences: cycled from a list, random words from a vocabulary, or a Markov
    chain over a vocabulary."""

    type: str
    sentences: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    sentence_length: tuple[int, int] = (5, 12)
    sentence_end: str = "."
    successors: tuple[tuple[int, ...], ...] = ()  # markov: successor word indices of each word
    weights: tuple[float, ...] = ()  # markov: relative probability of each successor slot
    jump_probability: float = 0.0  # markov: chance that the next word is drawn uniformly instead

    def sentence(self, rng: random.Random) -> str:
        if self.type == "sentences":
            return rng.choice(self.sentences)
        length = rng.randint(*self.sentence_length)
        if self.type == "words":
            return " ".join(rng.choice(self.words) for _ in range(length)) + self.sentence_end
        state = rng.randrange(len(self.words))
        chosen = [state]
        for _ in range(length - 1):
            if rng.random() < self.jump_probability:
                state = rng.randrange(len(self.words))
            else:
                state = rng.choices(self.successors[state], self.weights)[0]
            chosen.append(state)
        return " ".join(self.words[i] for i in chosen) + self.sentence_end

    def contains(self, word: str) -> bool:
        """Whether filler can contain ``word`` (a key or answer, possibly several words)."""
        if self.type in ("words", "markov"):
            return word in self.words
        pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
        return any(pattern.search(sentence) for sentence in self.sentences)

    def as_json(self) -> dict:
        if self.type == "sentences":
            return {"type": "sentences", "sentences": list(self.sentences)}
        record = {"type": self.type, "words": list(self.words), "sentence_length": list(self.sentence_length),
                  "sentence_end": self.sentence_end}
        if self.type == "markov":
            record.update(successors=[list(row) for row in self.successors], weights=list(self.weights),
                          jump_probability=self.jump_probability)
        return record


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    variables: tuple[str, ...]
    assign: str
    alias: str
    instruction: str
    question: str
    answer_prefix: str


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    name: str
    fact: str
    question: str
    keys: tuple[str, ...]
    answers: tuple[str, ...]
    filler: Filler
    preamble: str = ""
    candidates: Optional[int] = None
    separator: str = " "
    answer_separator: str = " "
    description: str = ""
    variable_tracking: Optional[VariableTracking] = None
    source: str = "<built in>"

    @property
    def num_candidates(self) -> int:
        return min(self.candidates or len(self.answers), len(self.answers))

    def render_fact(self, key: str, answer: str) -> str:
        return self.fact.format(key=key, answer=answer)

    def render_question(self, key: str) -> str:
        return self.question.format(key=key)

    def as_json(self) -> dict:
        record = {
            "format": SPEC_FORMAT, "version": SPEC_VERSION, "name": self.name, "description": self.description,
            "preamble": self.preamble, "fact": self.fact, "question": self.question, "keys": list(self.keys),
            "answers": list(self.answers), "separator": self.separator, "answer_separator": self.answer_separator,
            "filler": self.filler.as_json(),
        }
        if self.candidates is not None:
            record["candidates"] = self.candidates
        if self.variable_tracking is not None:
            record["variable_tracking"] = {name: list(value) if isinstance(value, tuple) else value
                                           for name, value in dataclasses.asdict(self.variable_tracking).items()}
        return record


def _fail(source: str, what: str) -> BadInputError:
    return BadInputError(f"task specification {source}: {what}")


def _string(record: dict, field: str, source: str, *, required: bool = True, default: str = "") -> str:
    if field not in record:
        if required:
            raise _fail(source, f"missing field {field!r}")
        return default
    value = record[field]
    if not isinstance(value, str):
        raise _fail(source, f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _string_list(record: dict, field: str, source: str, *, minimum: int = 1) -> tuple[str, ...]:
    value = record.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(source, f"field {field!r} must be a list of non-empty strings")
    if len(value) < minimum:
        raise _fail(source, f"field {field!r} needs at least {minimum} entries, has {len(value)}")
    if len(set(value)) != len(value):
        duplicates = sorted({v for v in value if value.count(v) > 1})
        raise _fail(source, f"field {field!r} repeats {duplicates[:5]}")
    return tuple(value)


def _check_placeholders(template: str, allowed: set[str], required: set[str], field: str, source: str) -> None:
    import string

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise _fail(source, f"field {field!r} is not a valid template ({err}); write a literal brace as {{{{ or }}}}")
    if names - allowed:
        raise _fail(source, f"field {field!r} uses unknown placeholder(s) {sorted(names - allowed)}; "
                            f"allowed: {sorted(allowed)}")
    if required - names:
        raise _fail(source, f"field {field!r} must contain {', '.join('{' + n + '}' for n in sorted(required - names))}")


def _parse_filler(value, source: str) -> Filler:
    if not isinstance(value, dict) or value.get("type") not in ("sentences", "words", "markov"):
        raise _fail(source, "field 'filler' must be an object with type 'sentences', 'words' or 'markov'")
    if value["type"] == "sentences":
        unknown = set(value) - {"type", "sentences"}
        if unknown:
            raise _fail(source, f"filler of type 'sentences' has unknown field(s) {sorted(unknown)}")
        return Filler("sentences", sentences=_string_list(value, "sentences", f"{source} (filler)"))
    kind = value["type"]
    chain_fields = {"successors", "weights", "jump_probability"} if kind == "markov" else set()
    unknown = set(value) - {"type", "words", "sentence_length", "sentence_end"} - chain_fields
    if unknown:
        raise _fail(source, f"filler of type {kind!r} has unknown field(s) {sorted(unknown)}")
    length = value.get("sentence_length", [5, 12])
    if (not isinstance(length, list) or len(length) != 2 or not all(isinstance(n, int) for n in length)
            or not 1 <= length[0] <= length[1]):
        raise _fail(source, "filler 'sentence_length' must be [min, max] with 1 <= min <= max")
    end = value.get("sentence_end", ".")
    if not isinstance(end, str):
        raise _fail(source, "filler 'sentence_end' must be a string")
    words = _string_list(value, "words", f"{source} (filler)", minimum=2)
    if kind == "words":
        return Filler("words", words=words, sentence_length=(length[0], length[1]), sentence_end=end)
    return Filler("markov", words=words, sentence_length=(length[0], length[1]), sentence_end=end,
                  **_parse_chain(value, len(words), source))


def _parse_chain(value: dict, num_words: int, source: str) -> dict:
    """The chain fields of a ``markov`` filler, checked: every row names valid word indices, one
    weight per successor slot, and a jump probability in [0, 1]."""
    weights = value.get("weights")
    if (not isinstance(weights, list) or not weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                                and w >= 0 for w in weights) or sum(weights) <= 0):
        raise _fail(source, "markov filler 'weights' must be a non-empty list of non-negative numbers, not all 0")
    rows = value.get("successors")
    if not isinstance(rows, list) or len(rows) != num_words:
        raise _fail(source, f"markov filler 'successors' must be a list with one row per word ({num_words})")
    for i, row in enumerate(rows):
        if (not isinstance(row, list) or len(row) != len(weights)
                or not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < num_words for j in row)):
            raise _fail(source, f"markov filler 'successors'[{i}] must list {len(weights)} word indices "
                                f"in [0, {num_words})")
    jump = value.get("jump_probability", 0.0)
    if isinstance(jump, bool) or not isinstance(jump, (int, float)) or not 0.0 <= jump <= 1.0:
        raise _fail(source, "markov filler 'jump_probability' must be a number in [0, 1]")
    return {"successors": tuple(tuple(row) for row in rows), "weights": tuple(float(w) for w in weights),
            "jump_probability": float(jump)}


def _parse_variable_tracking(value, source: str) -> VariableTracking:
    if not isinstance(value, dict):
        raise _fail(source, "field 'variable_tracking' must be an object")
    unknown = set(value) - _VT_FIELDS
    if unknown:
        raise _fail(source, f"variable_tracking has unknown field(s) {sorted(unknown)}; known: {sorted(_VT_FIELDS)}")
    where = f"{source} (variable_tracking)"
    vt = VariableTracking(
        variables=_string_list(value, "variables", where, minimum=12),
        assign=_string(value, "assign", where), alias=_string(value, "alias", where),
        instruction=_string(value, "instruction", where), question=_string(value, "question", where),
        answer_prefix=_string(value, "answer_prefix", where),
    )
    _check_placeholders(vt.assign, {"variable", "value"}, {"variable", "value"}, "variable_tracking.assign", source)
    _check_placeholders(vt.alias, {"variable", "source"}, {"variable", "source"}, "variable_tracking.alias", source)
    _check_placeholders(vt.instruction, set(), set(), "variable_tracking.instruction", source)
    _check_placeholders(vt.question, {"value"}, {"value"}, "variable_tracking.question", source)
    _check_placeholders(vt.answer_prefix, {"value", "num_v"}, set(), "variable_tracking.answer_prefix", source)
    return vt


def parse_spec(record, source: str = "<spec>") -> ProbeSpec:
    """Validate a decoded specification; errors name ``source`` and the field."""
    if not isinstance(record, dict):
        raise _fail(source, "the top level must be a JSON object")
    if record.get("format") != SPEC_FORMAT:
        raise _fail(source, f"field 'format' must be {SPEC_FORMAT!r} (is this a probe specification?)")
    if record.get("version") != SPEC_VERSION:
        raise _fail(source, f"version {record.get('version')!r} is not supported (this build reads {SPEC_VERSION})")
    unknown = set(record) - _TOP_FIELDS
    if unknown:
        raise _fail(source, f"unknown field(s) {sorted(unknown)}; known: {sorted(_TOP_FIELDS)}")
    fact, question = _string(record, "fact", source), _string(record, "question", source)
    _check_placeholders(fact, {"key", "answer"}, {"key", "answer"}, "fact", source)
    _check_placeholders(question, {"key"}, {"key"}, "question", source)
    preamble = _string(record, "preamble", source, required=False)
    _check_placeholders(preamble, set(), set(), "preamble", source)
    candidates = record.get("candidates")
    answers = _string_list(record, "answers", source, minimum=2)
    if candidates is not None and (not isinstance(candidates, int) or isinstance(candidates, bool)
                                   or not 2 <= candidates <= len(answers)):
        raise _fail(source, f"field 'candidates' must be an integer in [2, {len(answers)}] (the number of answers)")
    spec = ProbeSpec(
        name=_string(record, "name", source), description=_string(record, "description", source, required=False),
        fact=fact, question=question, preamble=preamble,
        keys=_string_list(record, "keys", source), answers=answers,
        filler=_parse_filler(record.get("filler"), source), candidates=candidates,
        separator=_string(record, "separator", source, required=False, default=" "),
        answer_separator=_string(record, "answer_separator", source, required=False, default=" "),
        variable_tracking=(_parse_variable_tracking(record["variable_tracking"], source)
                           if "variable_tracking" in record else None),
        source=source,
    )
    leaked = sorted(w for w in set(spec.answers) | set(spec.keys) if spec.filler.contains(w))
    if leaked:
        raise _fail(source, f"filler contains key(s)/answer(s) {leaked[:5]}: remove them from the filler, "
                            "or the probe cannot tell recall of the fact from the filler")
    in_question = sorted(a for a in spec.answers if re.search(rf"(?<!\w){re.escape(a)}(?!\w)",
                                                                spec.question.replace("{key}", " ")))
    if in_question:
        raise _fail(source, f"the question gives away answer(s) {in_question[:5]}")
    return spec


def load_spec(path: Union[str, Path, None] = None) -> ProbeSpec:
    """Read and validate a specification file (default: the shipped natural-language one)."""
    path = Path(path) if path is not None else DEFAULT_SPEC_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"task specification {path}: no such file") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(f"task specification {path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg})") from None
    return parse_spec(record, str(path))


def default_spec() -> ProbeSpec:
    return load_spec(DEFAULT_SPEC_PATH)


def write_spec(path: Union[str, Path], spec: ProbeSpec) -> Path:
    """Write ``spec`` (validated first) atomically, e.g. from a synthetic-corpus generator."""
    record = spec.as_json()
    parse_spec(record, str(path))
    return atomic_io.write_json(path, record)
