"""The distance-resolved evidence probe: does the model use a fact ``d`` tokens back?

A sample at total length ``L`` and distance ``d`` is built from token pieces (so the distance is
exact, not approximate)::

    [BOS] preamble  filler[:p]  FACT  filler[p:p+d]  QUESTION | candidate answer

``d`` is the number of filler tokens between the last token of the fact and the first token
of the question; ``p`` is chosen so that prompt + longest candidate = ``L`` tokens. The ablated
prompt is the same token sequence with the fact removed (nothing else differs). Each candidate
answer (the correct one and distractors from the specification's answer set) is scored by
teacher-forced log-probability; a sample is correct when the right answer scores strictly
highest, and its margin is that score minus the best distractor's.

Key, answer, candidates and filler depend on ``(seed, index)`` only: at one index, every
distance and length shows the same fact in the same filler, only moved (a controlled sweep).

Python API (used by the CLI, the trainer's ``--eval-probe`` and other tools)::

    samples = distance_sweep(spec, codec, length=4096, distances=[64, 256, 1024], num_samples=20)
    records = score_samples(scorer, samples)          # scorer: HFModel or ForwardScorer
    table = summarize(records)                        # per (sweep, length, distance) cell

``codec`` is anything with ``encode(text) -> ids`` and ``bos`` (the ids the tokenizer prepends):
:class:`~megatron_exact.eval.backend.HFModel` or :class:`~megatron_exact.eval.codec.TokenizerCodec`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterable, Optional, Sequence

from megatron_exact.errors import BadInputError
from megatron_exact.eval.codec import TokenizerCodec  # noqa: F401  (part of the probe's API)
from megatron_exact.eval.spec import ProbeSpec


@dataclasses.dataclass
class ProbeSample:
    sweep: str  # "distance" (fixed length) or "length" (fixed distance)
    index: int
    length: int
    distance: int
    key: str
    answer: str
    candidates: list[str]
    answer_index: int
    present: list[int]
    ablated: list[int]
    fact_span: tuple[int, int]  # [start, end) of the fact's tokens in ``present``
    question_start: int  # first question token in ``present``
    candidate_ids: list[list[int]]

    def metadata(self) -> dict:
        return {
            "sweep": self.sweep, "index": self.index, "length": self.length, "distance": self.distance,
            "key": self.key, "answer": self.answer, "candidates": self.candidates,
            "answer_index": self.answer_index, "prompt_tokens": len(self.present),
            "ablated_prompt_tokens": len(self.ablated), "fact_span": list(self.fact_span),
            "question_start": self.question_start,
        }


class _FillerStream:
    """Filler tokens for one sample, generated sentence by sentence on demand (deterministic)."""

    def __init__(self, spec: ProbeSpec, codec, seed: str, cache: dict):
        self.spec, self.codec, self.cache = spec, codec, cache
        self.rng = random.Random(seed)
        self.tokens: list[int] = []

    def take(self, count: int) -> list[int]:
        while len(self.tokens) < count:
            sentence = self.spec.separator + self.spec.filler.sentence(self.rng)
            ids = self.cache.get(sentence)
            if ids is None:
                ids = self.cache[sentence] = self.codec.encode(sentence)
            if not ids:
                raise BadInputError(f"task specification {self.spec.source}: a filler sentence encodes to no tokens")
            self.tokens.extend(ids)
        return self.tokens[:count]


def build_sample(spec: ProbeSpec, codec, *, length: int, distance: int, index: int, seed: int = 0,
                 sweep: str = "distance", _cache: Optional[dict] = None) -> ProbeSample:
    """One probe sample (see the module docstring for the layout)."""
    if distance < 0:
        raise BadInputError(f"probe distance {distance}: must be >= 0")
    rng = random.Random(f"probe-{seed}-{index}")
    key = rng.choice(spec.keys)
    answer = rng.choice(spec.answers)
    distractors = rng.sample([a for a in spec.answers if a != answer], spec.num_candidates - 1)
    candidates = [answer] + distractors
    rng.shuffle(candidates)
    cache = {} if _cache is None else _cache

    head = list(codec.bos) + (codec.encode(spec.preamble) if spec.preamble else [])
    fact = codec.encode(spec.separator + spec.render_fact(key, answer))
    question = codec.encode(spec.separator + spec.render_question(key))
    candidate_ids = [codec.encode(spec.answer_separator + c) for c in candidates]
    if not all(candidate_ids):
        raise BadInputError(f"task specification {spec.source}: an answer encodes to no tokens")
    longest = max(len(c) for c in candidate_ids)
    before = length - len(head) - len(fact) - distance - len(question) - longest
    if before < 0:
        fixed = length - before - distance
        raise BadInputError(
            f"probe distance {distance} does not fit in length {length}: the prompt's fixed parts take {fixed} "
            f"tokens, so distances up to {length - fixed} fit; lower the distance or raise the length")
    filler = _FillerStream(spec, codec, f"probe-filler-{seed}-{index}", cache).take(before + distance)
    present = head + filler[:before] + fact + filler[before:] + question
    ablated = head + filler[:before] + filler[before:] + question
    fact_start = len(head) + before
    return ProbeSample(
        sweep=sweep, index=index, length=length, distance=distance, key=key, answer=answer,
        candidates=candidates, answer_index=candidates.index(answer), present=present, ablated=ablated,
        fact_span=(fact_start, fact_start + len(fact)), question_start=fact_start + len(fact) + distance,
        candidate_ids=candidate_ids,
    )


def default_distances(length: int, smallest: int = 64) -> list[int]:
    """Log-spaced distances (powers of two from ``smallest``) below half of ``length``."""
    distances, d = [], smallest
    while d <= length // 2:
        distances.append(d)
        d *= 2
    return distances or [0]


def distance_sweep(spec: ProbeSpec, codec, *, length: int, distances: Sequence[int], num_samples: int,
                   seed: int = 0) -> list[ProbeSample]:
    """Fixed total ``length``, the fact at each of ``distances``."""
    cache: dict = {}
    return [build_sample(spec, codec, length=length, distance=d, index=i, seed=seed, sweep="distance", _cache=cache)
            for d in distances for i in range(num_samples)]


def length_sweep(spec: ProbeSpec, codec, *, distance: int, lengths: Sequence[int], num_samples: int,
                 seed: int = 0) -> list[ProbeSample]:
    """The mirror sweep: fixed ``distance``, total length varied."""
    cache: dict = {}
    return [build_sample(spec, codec, length=n, distance=distance, index=i, seed=seed, sweep="length", _cache=cache)
            for n in lengths for i in range(num_samples)]


def rank_scores(scores: Sequence[float], answer_index: int) -> tuple[bool, float]:
    """(correct, margin): the answer strictly above every distractor, and by how much."""
    best_other = max(s for i, s in enumerate(scores) if i != answer_index)
    margin = scores[answer_index] - best_other
    return margin > 0, margin


def score_samples(scorer, samples: Iterable[ProbeSample],
                  progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Score every sample with and without its fact; one record per sample, in the samples' order.

    Every distinct prompt is scored once, all of them in one call to the scorer (which picks the
    order: :class:`~megatron_exact.eval.backend.HFModel` reuses shared prefixes). A sweep's ablated
    prompts are one filler for all its distances (the fact is what moves), so most of them repeat.
    ``progress(1)`` is called when both of a sample's prompts are scored."""
    samples = list(samples)
    keys: dict = {}  # (prompt, candidates) -> item number
    items, waiting, needs = [], [], []
    item_of = []  # per sample: the item numbers of its present and ablated prompts
    for number, sample in enumerate(samples):
        pair = []
        for prompt in (sample.present, sample.ablated):
            key = (tuple(prompt), tuple(map(tuple, sample.candidate_ids)))
            if key not in keys:
                keys[key] = len(items)
                items.append((prompt, sample.candidate_ids))
                waiting.append([])
            pair.append(keys[key])
        item_of.append(pair)
        for item in set(pair):
            waiting[item].append(number)
        needs.append(len(set(pair)))

    def done(item: int) -> None:
        for number in waiting[item]:
            needs[number] -= 1
            if needs[number] == 0 and progress is not None:
                progress(1)

    scores = scorer.score_prompts(items, done)
    records = []
    for sample, pair in zip(samples, item_of):
        record = sample.metadata()
        for variant, item in zip(("present", "ablated"), pair):
            item_scores = scores[item]
            correct, margin = rank_scores(item_scores, sample.answer_index)
            record[variant] = {"logprobs": item_scores, "correct": correct, "margin": margin}
        records.append(record)
    return records


def summarize(records: Iterable[dict]) -> list[dict]:
    """Per (sweep, length, distance) cell: n, accuracy and mean margin with the fact present and ablated."""
    cells: dict = {}
    for record in records:
        cells.setdefault((record["sweep"], record["length"], record["distance"]), []).append(record)
    table = []
    for (sweep, length, distance), rows in sorted(cells.items()):
        n = len(rows)
        cell = {"sweep": sweep, "length": length, "distance": distance, "n": n}
        for variant in ("present", "ablated"):
            cell[f"accuracy_{variant}"] = sum(r[variant]["correct"] for r in rows) / n
            cell[f"margin_{variant}"] = sum(r[variant]["margin"] for r in rows) / n
        table.append(cell)
    return table
