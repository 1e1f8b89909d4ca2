"""NoLiMa-style latent-association probe: the question shares no content word with its needle.

A needle set is a JSON list in NoLiMa's needle-set format (our own set ships as
``data/nolima_needles.json``; the real one is read from ``--nolima-dir``)::

    [{"id": "ME01", "reasoning_type": "world_knowledge", "system_prompt": "",
      "needle": "{CHAR} spent last winter sketching the {1}.",
      "questions": {"onehop": "Which character has been to {2}?"},
      "character_set": ["Yuki", "Stuart", ...],
      "tests": {"T01": {"input_args": ["Eiffel Tower", "Paris"]}, ...},
      "task_template": "... {haystack} ... {question} ..."}]   # task_template optional

``{1}``, ``{2}``, ... are the test's ``input_args`` (1-based), ``{CHAR}`` a character drawn from the
set; the gold answer is that character, scored with the ``contains`` metric. The needle goes into
the haystack (NoLiMa's books under ``--nolima-dir/haystack``, ``--haystack-file``, or the shipped
probe filler) at each requested depth, at a sentence boundary; the haystack is fitted to each
length with the model's tokenizer, as the RULER-style tasks are.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_exact.eval import ruler
from megatron_exact.errors import BadInputError

SHIPPED = Path(__file__).with_name("data") / "nolima_needles.json"
DEFAULT_NEEDLE_SET = "needle_set.json"
TOKENS_TO_GENERATE = 32
TASK_TEMPLATE = ("Read the text below, then answer the question that follows it.\n\n{haystack}\n\n"
                 "Answer with a name only, using what the text states or clearly implies.\n"
                 "Question: {question}\nAnswer:")
STOPWORDS = frozenset(
    "a an the of to in on at for from by with and or but is are was were be been being has have had do does did "
    "which who whom whose what when where why how this that these those it its as into onto over under than then "
    "there their they them he she his her him i you we our your my me us not no yes would could should can will "
    "shall may might must ever only once also very just".split())


@dataclasses.dataclass(frozen=True)
class NeedleItem:
    entry_id: str
    test_id: str
    question_type: str
    needle: str  # template with {CHAR} and {1}.. filled except {CHAR}
    question: str
    characters: tuple[str, ...]
    task_template: str
    reasoning_type: str


@dataclasses.dataclass(frozen=True)
class NeedleSet:
    name: str
    source: str
    items: tuple[NeedleItem, ...]


def _fill(template: str, args: Sequence[str], where: str, field: str) -> str:
    """NoLiMa's placeholders: {1}.. are input_args (1-based); {CHAR} stays for the character."""
    try:
        return template.format("", *args, CHAR="{CHAR}")
    except IndexError:
        raise BadInputError(f"{where}: {field} {template!r} uses a placeholder beyond its {len(args)} input_args")
    except (KeyError, ValueError) as err:
        raise BadInputError(f"{where}: {field} {template!r} is not a valid template ({err})")


def parse_needle_set(records, source: str) -> NeedleSet:
    if not isinstance(records, list) or not records:
        raise BadInputError(f"needle set {source}: the top level must be a non-empty JSON list of needle entries")
    items = []
    for position, entry in enumerate(records):
        where = f"needle set {source}, entry {position}"
        if not isinstance(entry, dict):
            raise BadInputError(f"{where}: must be a JSON object")
        where = f"needle set {source}, entry {entry.get('id', position)!r}"
        for field, kind in (("id", str), ("needle", str), ("questions", dict), ("character_set", list),
                            ("tests", dict)):
            if not isinstance(entry.get(field), kind):
                raise BadInputError(f"{where}: field {field!r} missing or not a {kind.__name__}")
        characters = entry["character_set"]
        if not characters or not all(isinstance(c, str) and c for c in characters):
            raise BadInputError(f"{where}: 'character_set' must be a non-empty list of names")
        if "{CHAR}" not in entry["needle"]:
            raise BadInputError(f"{where}: 'needle' must contain {{CHAR}} (the answer)")
        template = entry.get("task_template") or TASK_TEMPLATE
        names = {n for _, n, _, _ in string.Formatter().parse(template) if n is not None}
        if names != {"haystack", "question"}:
            raise BadInputError(f"{where}: 'task_template' must use exactly {{haystack}} and {{question}}, "
                                 f"uses {sorted(names)}")
        for test_id, test in entry["tests"].items():
            args = test.get("input_args") if isinstance(test, dict) else None
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise BadInputError(f"{where}, test {test_id!r}: 'input_args' must be a list of strings")
            for question_type, question in entry["questions"].items():
                if not isinstance(question, str):
                    raise BadInputError(f"{where}: question {question_type!r} must be a string")
                items.append(NeedleItem(
                    entry_id=entry["id"], test_id=test_id, question_type=question_type,
                    needle=_fill(entry["needle"], args, where, "needle"),
                    question=_fill(question, args, where, f"question {question_type!r}"),
                    characters=tuple(characters), task_template=template,
                    reasoning_type=str(entry.get("reasoning_type", "")),
                ))
    return NeedleSet(name=Path(source).stem, source=source, items=tuple(items))


def load_needle_set(nolima_dir: Union[str, Path, None] = None, needle_set: Optional[str] = None) -> NeedleSet:
    """The shipped set, or ``needlesets/<needle_set>`` (default ``needle_set.json``) under ``nolima_dir``."""
    if nolima_dir is None:
        if needle_set is not None:
            raise BadInputError("--needle-set needs --nolima-dir (the directory holding needlesets/)")
        path = SHIPPED
    else:
        root = Path(nolima_dir)
        if not root.is_dir():
            raise BadInputError(f"--nolima-dir {root}: not a directory")
        path = root / "needlesets" / (needle_set or DEFAULT_NEEDLE_SET)
        if not path.is_file():
            found = sorted(p.name for p in (root / "needlesets").glob("*.json")) if (root / "needlesets").is_dir() else []
            raise BadInputError(f"--nolima-dir {root}: no {path.relative_to(root)}"
                                 + (f" (found {', '.join(found)}; choose with --needle-set)" if found else
                                    " (expected NoLiMa's layout: needlesets/*.json, haystack/)"))
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadInputError(f"needle set {path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg})") from None
    return parse_needle_set(records, str(path))


def default_haystack(nolima_dir: Union[str, Path, None] = None) -> str:
    """NoLiMa's first shuffled book when the data is local, else the probe's shipped English filler."""
    if nolima_dir is not None:
        books = sorted((Path(nolima_dir) / "haystack").rglob("*.txt"))
        if books:
            return books[0].read_text(encoding="utf-8")
    from megatron_exact.eval.spec import default_spec

    sentences = list(default_spec().filler.sentences)
    random.Random("nolima-haystack").shuffle(sentences)
    return " ".join(sentences)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS and w != "char"}


@dataclasses.dataclass
class NoLiMaSample:
    task: str
    length: int
    index: int
    prompt: str
    prompt_ids: list[int]
    references: list[str]
    max_new_tokens: int
    metric: str
    metadata: dict


def generate_samples(needle_set: NeedleSet, codec, haystack_text: str, *, lengths: Sequence[int],
                     depths: Sequence[float], num_samples: int, seed: int = 0,
                     max_new_tokens: int = TOKENS_TO_GENERATE) -> list[NoLiMaSample]:
    """``num_samples`` needle items (a seeded choice) x ``depths`` x ``lengths``, each fitted to its length."""
    order = list(range(len(needle_set.items)))
    random.Random(f"nolima-{seed}").shuffle(order)
    chosen = order[:num_samples]
    sentences = ruler.split_sentences(re.sub(r"\s+", " ", haystack_text))
    if not sentences:
        raise BadInputError("the NoLiMa haystack holds no sentences")
    bos = list(codec.bos)

    def count_tokens(text: str) -> int:
        return len(bos) + len(codec.encode(text))

    samples = []
    for length in lengths:
        for item_number, item_index in enumerate(chosen):
            item = needle_set.items[item_index]
            character = random.Random(f"nolima-{seed}-{item_index}").choice(item.characters)
            needle = item.needle.replace("{CHAR}", character)
            for depth_number, depth in enumerate(depths):
                def build(n: int) -> str:
                    hay = (sentences * (n // len(sentences) + 1))[:n]
                    at = round(n * depth / 100)
                    text = " ".join(hay[:at] + [needle] + hay[at:])
                    return item.task_template.format(haystack=text, question=item.question)

                units, prompt = ruler.fit_units(build, count_tokens, length - max_new_tokens, task="nolima",
                                                length=length)
                samples.append(NoLiMaSample(
                    task="nolima", length=length, index=item_number * len(depths) + depth_number, prompt=prompt,
                    prompt_ids=bos + codec.encode(prompt), references=[character], max_new_tokens=max_new_tokens,
                    metric="contains",
                    metadata={"entry": item.entry_id, "test": item.test_id, "question_type": item.question_type,
                              "reasoning_type": item.reasoning_type, "needle": needle, "question": item.question,
                              "depth": depth, "haystack_units": units},
                ))
    return samples
