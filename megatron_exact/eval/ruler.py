"""RULER-style synthetic tasks, generated offline following NVIDIA RULER's templates and rules.

Tasks (RULER's names and settings):

- ``niah_single_1``: one needle in a noise haystack (repeated "The grass is green..." lines), key a
  word, value a 7-digit number;
- ``niah_multikey_2``: the haystack is made of needles with other keys, value a number;
- ``niah_multikey_3``: needle haystack with UUID keys and values;
- ``vt``: variable tracking, one chain of four hops in noise, with a one-shot example;
- ``cwe``: common words extraction (10 words repeated 30 times among words repeated 3 times;
  6/1 below 4K tokens), with a one-shot example;
- ``fwe``: frequent words extraction from coded words drawn from a zeta(2) distribution;
- with ``--haystack-file`` (the user's own prose, RULER's "essay" haystack): ``niah_single_2``,
  ``niah_single_3``, ``niah_multikey_1``, ``niah_multivalue``, ``niah_multiquery``.

Every prompt is the task template followed by its answer prefix (RULER's "base" template); the
number of haystack units (noise lines, needles, essay words, list words) is the largest for
which BOS + prompt tokens + the task's generation budget fit the requested length, found with
the model's own tokenizer, so each prompt is within one haystack unit of the length. Samples
are deterministic in (task, length, index, seed). Words come from the ``wonderwords`` package.

With a task specification (``--spec``), the tasks a specification can express are written in its
language: ``niah_single_1`` (one fact in the specification's filler), ``niah_multikey_2`` (the
haystack is facts about other keys) and ``vt`` (its ``variable_tracking`` section).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import uuid
from typing import Callable, Optional

from megatron_exact.errors import BadInputError
from megatron_exact.eval.spec import ProbeSpec

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclasses.dataclass(frozen=True)
class NiahTask:
    haystack: str  # noise | needle | essay
    type_needle_k: str  # words | numbers | uuids
    type_needle_v: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1
    family: str = "niah"


@dataclasses.dataclass(frozen=True)
class OtherTask:
    family: str  # vt | cwe | fwe


TASKS = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_needle_q=4),
    "vt": OtherTask("vt"),
    "cwe": OtherTask("cwe"),
    "fwe": OtherTask("fwe"),
}
DEFAULT_TASKS = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"]
SPEC_TASKS = ["niah_single_1", "niah_multikey_2", "vt"]
ESSAY_TASKS = [name for name, task in TASKS.items() if getattr(task, "haystack", None) == "essay"]
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
METRIC = {"niah": "string_match_all", "vt": "string_match_all", "cwe": "string_match_all", "fwe": "string_match_all"}


@dataclasses.dataclass
class RulerSample:
    task: str
    length: int
    index: int
    prompt: str  # template + answer prefix, as the model sees it (after BOS)
    prompt_ids: list[int]
    references: list[str]
    max_new_tokens: int
    metric: str
    metadata: dict


def task_family(name: str) -> str:
    return TASKS[name].family


def check_tasks(tasks, *, spec: Optional[ProbeSpec], haystack_text: Optional[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BadInputError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if spec is not None:
        outside = [t for t in tasks if t not in SPEC_TASKS]
        if outside:
            raise BadInputError(f"--tasks {' '.join(outside)}: not expressible in a task specification (--spec "
                                 f"{spec.source}); with --spec choose from {', '.join(SPEC_TASKS)}")
        if "vt" in tasks and spec.variable_tracking is None:
            raise BadInputError(f"--tasks vt with --spec {spec.source}: the specification has no "
                                 "'variable_tracking' section")
    essay = [t for t in tasks if t in ESSAY_TASKS]
    if essay and haystack_text is None:
        raise BadInputError(f"--tasks {' '.join(essay)}: essay-haystack tasks need --haystack-file (your own prose)")


# -- word sources -----------------------------------------------------------------------------
_WORDS: dict = {}


def wonder_words(category: str) -> list[str]:
    """wonderwords' word list for ``noun``/``adjective``/``verb`` (sorted, as shipped with the package)."""
    if category not in _WORDS:
        from wonderwords import RandomWord

        _WORDS[category] = sorted(set(RandomWord().filter(include_categories=[category])))
    return _WORDS[category]


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(wonder_words('adjective'))}-{rng.choice(wonder_words('noun'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _interleave(haystack: list[str], needles: list[str], rng: random.Random) -> list[str]:
    """``needles`` (in order) at random distinct positions among ``haystack``'s lines."""
    total = len(haystack) + len(needles)
    at = set(rng.sample(range(total), len(needles)))
    lines, hay, pins = [], iter(haystack), iter(needles)
    for position in range(total):
        lines.append(next(pins) if position in at else next(hay))
    return lines


# -- fitting to a length ------------------------------------------------------------------------
def fit_units(build: Callable[[int], str], count_tokens: Callable[[str], int], budget: int, *, task: str,
              length: int, start: int = 16) -> tuple[int, str]:
    """The largest number of haystack units ``n`` with ``count_tokens(build(n)) <= budget``
    (exponential search, then bisection); refuses a length too short for the task's fixed text."""
    smallest = build(0)
    if count_tokens(smallest) > budget:
        raise BadInputError(f"--lengths {length}: too short for {task}: without any haystack its prompt takes "
                             f"{count_tokens(smallest)} tokens, {budget} are available; use a longer length")
    low, high = 0, max(1, start)
    while count_tokens(build(high)) <= budget:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if count_tokens(build(middle)) <= budget:
            low = middle
        else:
            high = middle
    return low, build(low)


# -- task builders: each returns build(n, rng) -> (prompt, references, metadata) -----------------------
def _niah_builder(task: NiahTask, haystack_words: Optional[list[str]]):
    type_v = task.type_needle_v
    singular = task.num_needle_q * task.num_needle_v == 1

    def build(n: int, rng: random.Random):
        num_k = max(task.num_needle_k, task.num_needle_q)
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(_random_value(task.type_needle_k, rng))
            values.append([])
            for _ in range(task.num_needle_v):
                values[-1].append(_random_value(type_v, rng))
                needles.append(NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=values[-1][-1]))
        rng.shuffle(needles)
        if task.haystack == "essay":
            words = (haystack_words * (n // len(haystack_words) + 1))[:n]
            sentences = split_sentences(" ".join(words))
            cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
            pieces, last = [], 0
            for cut, needle in zip(cuts, needles):
                pieces.append(" ".join(sentences[last:cut]))
                pieces.append(needle)
                last = cut
            pieces.append(" ".join(sentences[last:]))
            context = " ".join(p for p in pieces if p)
        else:
            if task.haystack == "noise":
                lines = [NOISE] * n
            else:
                lines = [NEEDLE.format(type_needle_v=type_v, key=_random_value(task.type_needle_k, rng),
                                       value=_random_value(type_v, rng)) for _ in range(n)]
            context = "\n".join(_interleave(lines, needles, rng))
        chosen = rng.sample(range(num_k), task.num_needle_q)
        queries = [keys[i] for i in chosen]
        answers = [a for i in chosen for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
        shown_v = type_v
        if singular:
            template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                        .replace("answers", "answer"))
            shown_v = type_v[:-1]
        prompt = template.format(type_needle_v=shown_v, context=context, query=query)
        return prompt, answers, {"needles": needles, "queries": queries, "haystack_units": n}

    return build


def _spec_niah_builder(task: NiahTask, spec: ProbeSpec):
    """Key-value retrieval in a specification's language: facts as needles, its filler as noise."""
    sep = spec.separator

    def build(n: int, rng: random.Random):
        key = rng.choice(spec.keys)
        answer = rng.choice(spec.answers)
        needle = spec.render_fact(key, answer)
        if task.haystack == "noise":
            lines = [spec.filler.sentence(rng) for _ in range(n)]
        else:
            others = [k for k in spec.keys if k != key]
            lines = [spec.render_fact(rng.choice(others), rng.choice(spec.answers)) for _ in range(n)]
        lines = _interleave(lines, [needle], rng)
        head = [spec.preamble] if spec.preamble else []
        prompt = sep.join(head + lines + [spec.render_question(key)])
        return prompt, [answer], {"needles": [needle], "queries": [key], "haystack_units": n}

    return build


@dataclasses.dataclass(frozen=True)
class _VtLanguage:
    assign: str
    alias: str
    noise: Callable[[random.Random], str]
    variables: Callable[[random.Random, int, bool], list[str]]
    values: Callable[[random.Random, bool], str]
    prompt: Callable[[str, str, int], str]  # (context, value, num_v) -> template + answer prefix
    separator: str = "\n"


def _ruler_variables(rng: random.Random, count: int, icl: bool) -> list[str]:
    width = 3 if icl else 5
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=width))
        if name not in names:
            names.append(name)
    return names


_ENGLISH_VT = _VtLanguage(
    assign="VAR {variable} = {value}", alias="VAR {variable} = VAR {source} ",
    noise=lambda rng: NOISE, variables=_ruler_variables,
    values=lambda rng, icl: "12345" if icl else str(rng.randint(10000, 99999)),
    prompt=lambda context, value, num_v: (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=value,
                                                                                num_v=num_v),
)


def _spec_vt_language(spec: ProbeSpec) -> _VtLanguage:
    vt = spec.variable_tracking
    return _VtLanguage(
        assign=vt.assign, alias=vt.alias, noise=spec.filler.sentence,
        variables=lambda rng, count, icl: rng.sample(vt.variables, count),
        values=lambda rng, icl: rng.choice(spec.answers),
        prompt=lambda context, value, num_v: spec.separator.join(
            ([vt.instruction] if vt.instruction else []) + [context, vt.question.format(value=value),
                                                            vt.answer_prefix.format(value=value, num_v=num_v)]),
        separator=spec.separator,
    )


def _vt_chain(language: _VtLanguage, n: int, rng: random.Random, hops: int, icl: bool):
    names = language.variables(rng, hops + 1, icl)
    value = language.values(rng, icl)
    chain = [language.assign.format(variable=names[0], value=value)]
    chain += [language.alias.format(variable=names[j + 1], source=names[j]) for j in range(hops)]
    lines = _interleave([language.noise(rng) for _ in range(n)], chain, rng)
    context = language.separator.join(lines).replace(". \n", ".\n")
    return language.prompt(context, value, hops + 1), names, chain


def _vt_builder(language: _VtLanguage, example: str, hops: int = 4):
    def build(n: int, rng: random.Random):
        prompt, names, chain = _vt_chain(language, n, rng, hops, icl=False)
        return example + "\n" + prompt, names, {"chain": chain, "haystack_units": n}

    return build


def _vt_example(language: _VtLanguage, count_tokens, budget: int, rng: random.Random, length: int,
                hops: int = 4) -> str:
    """RULER's one-shot example: a short chain (3-letter names in English), answered."""
    def build(n: int) -> str:
        prompt, names, _ = _vt_chain(language, n, random.Random(seed), hops, icl=True)
        return prompt + " " + " ".join(names)

    seed = rng.random()
    _, text = fit_units(build, count_tokens, budget, task=f"vt's one-shot example ({budget} tokens)", length=length,
                        start=4)
    return text


def _cwe_builder(length: int):
    words = sorted(set(wonder_words("noun") + wonder_words("adjective") + wonder_words("verb")))
    if length < 4096:
        example_args, main_repeats = (20, 3, 1), (6, 1)
    else:
        example_args, main_repeats = (40, 10, 3), (30, 3)
    template = CWE_TEMPLATE + CWE_ANSWER_PREFIX

    def listing(rng, num_words, common_repeats, uncommon_repeats):
        if num_words > len(words):
            raise BadInputError(f"cwe at length {length}: needs {num_words} distinct words, wonderwords has "
                                 f"{len(words)}")
        chosen = rng.sample(words, num_words)
        common, uncommon = chosen[:10], chosen[10:]
        items = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    def build(n: int, rng: random.Random):
        example_context, example_answer = listing(rng, *example_args)
        example = template.format(context=example_context) + " " + " ".join(
            f"{i + 1}. {w}" for i, w in enumerate(example_answer))
        context, answer = listing(rng, 10 + n, *main_repeats)
        return example + "\n" + template.format(context=context), answer, {"haystack_units": n, "unique_words": 10 + n}

    return build


def _zeta(alpha: float, terms: int = 100000) -> float:
    """Riemann zeta(alpha) for alpha > 1: partial sum plus the integral tail."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def _fwe_builder(length: int, budget: int, alpha: float = 2.0, word_length: int = 6):
    vocab_size = max(budget // 50, 4)
    normaliser = _zeta(alpha)
    template = FWE_TEMPLATE + FWE_ANSWER_PREFIX

    def build(n: int, rng: random.Random):
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_length)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the most frequent "word" is noise
        total = 4 * (n + 1)
        sampled = [w for k, w in enumerate(words, start=1) for _ in range(int(total * k ** -alpha / normaliser))]
        rng.shuffle(sampled)
        return template.format(context=" ".join(sampled)), words[1:4], {"haystack_units": n, "coded_words": len(sampled)}

    return build


# -- the generator -------------------------------------------------------------------------------------
def _task_builder(task: str, count_tokens, *, length: int, max_new: int, seed: int, spec: Optional[ProbeSpec],
                  haystack_text: Optional[str]):
    """build(units, rng) -> (prompt, references, metadata) for ``task`` at ``length``."""
    family = task_family(task)
    budget = length - max_new
    definition = TASKS[task]
    if family == "niah":
        if spec is not None:
            return _spec_niah_builder(definition, spec)
        words = re.sub(r"\s+", " ", haystack_text).strip().split(" ") if definition.haystack == "essay" else None
        return _niah_builder(definition, words)
    if family == "vt":
        language = _spec_vt_language(spec) if spec is not None else _ENGLISH_VT
        # RULER fits the example to 500 tokens; short lengths give it a third of the budget.
        example = _vt_example(language, count_tokens, min(500, budget // 3),
                              random.Random(f"ruler-{task}-{seed}-{length}-example"), length)
        return _vt_builder(language, example)
    if family == "cwe":
        return _cwe_builder(length)
    return _fwe_builder(length, budget)


def _sample_rng(task: str, seed: int, length: int, index: int) -> random.Random:
    return random.Random(f"ruler-{task}-{seed}-{length}-{index}")


def generate_samples(task: str, codec, *, length: int, num_samples: int, seed: int = 0,
                     spec: Optional[ProbeSpec] = None, haystack_text: Optional[str] = None,
                     max_new_tokens: Optional[int] = None) -> list[RulerSample]:
    """``num_samples`` prompts of ``task`` fitted to ``length`` tokens with ``codec`` (the model's tokenizer),
    leaving room for the task's generation budget (RULER's, or ``max_new_tokens``)."""
    check_tasks([task], spec=spec, haystack_text=haystack_text)
    family = task_family(task)
    max_new = max_new_tokens or TOKENS_TO_GENERATE[family]
    bos = list(codec.bos)

    def count_tokens(text: str) -> int:
        return len(bos) + len(codec.encode(text))

    build = _task_builder(task, count_tokens, length=length, max_new=max_new, seed=seed, spec=spec,
                          haystack_text=haystack_text)
    samples = []
    for index in range(num_samples):
        units, _ = fit_units(lambda n: build(n, _sample_rng(task, seed, length, index))[0], count_tokens,
                             length - max_new, task=task, length=length)
        text, references, metadata = build(units, _sample_rng(task, seed, length, index))
        ids = bos + codec.encode(text)
        metadata = dict(metadata, prompt_tokens=len(ids), spec=spec.name if spec is not None else None)
        samples.append(RulerSample(task=task, length=length, index=index, prompt=text, prompt_ids=ids,
                                   references=list(references), max_new_tokens=max_new, metric=METRIC[family],
                                   metadata=metadata))
    return samples


def rebuild(task: str, codec, *, length: int, index: int, units: int, seed: int = 0,
            spec: Optional[ProbeSpec] = None, haystack_text: Optional[str] = None,
            max_new_tokens: Optional[int] = None) -> str:
    """The prompt of sample ``index`` with ``units`` haystack units (to check how it was fitted)."""
    bos = list(codec.bos)
    build = _task_builder(task, lambda t: len(bos) + len(codec.encode(t)), length=length,
                          max_new=max_new_tokens or TOKENS_TO_GENERATE[task_family(task)], seed=seed, spec=spec,
                          haystack_text=haystack_text)
    return build(units, _sample_rng(task, seed, length, index))[0]
