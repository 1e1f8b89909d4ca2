"""A synthetic word-level language with long-range dependencies, for CPU-sized EXACT studies.

Every word is one token (the tokenizer :func:`build_tokenizer_dir` writes is a
``WordLevel`` vocabulary of exactly these words), so distances are counted in
words. A document is:

- **filler**: words ``w0 .. w{n-1}`` from a sparse Markov chain (each word has
  a few likely successors, plus a small chance of a random jump), so most
  tokens are predictable from the last word alone;
- **facts** ``KEY k v`` in the first half of the document (distinct keys
  within a document), and later **recalls** ``QUERY k v`` in the second half:
  the ``v`` after ``QUERY k`` can only be predicted from the fact, stated up to
  nearly the whole document earlier.

Document lengths follow a Pareto law (shape ``pareto_shape``, scale
``length_scale`` words, capped at ``max_length``): most documents are short, a
few span several training windows, as in web text, so the supervision of a
packed window falls mostly at short effective context.

Generation is deterministic: document ``i`` depends only on
``(LanguageConfig, i)``, never on how many documents are generated or in what
order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Iterator, List

KEY_MARK = "KEY"
QUERY_MARK = "QUERY"
EOD_TOKEN = "<eod>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Everything that decides the generated text (and therefore the cache keys built from it)."""

    seed: int = 0
    # Few keys and values, and dense facts and recalls: with 16 keys/values and one fact or recall
    # per 48 words, recalls were ~1% of the tokens and the tiny CPU model (2 layers, d=128) stayed at
    # chance after 1.2M training tokens; with 4/4 and one per 4 words (~9% of the tokens), a
    # 200-step run of 16 x 128 tokens recalls at every distance of its window.
    num_keys: int = 4
    num_values: int = 4
    num_filler: int = 128
    successors: int = 3  # likely next words of each filler word
    jump_probability: float = 0.05  # chance that the next filler word is uniform instead
    pareto_shape: float = 0.9
    length_scale: int = 32  # words; the Pareto law's minimum
    max_length: int = 2048  # words; cap of the heavy tail
    fact_spacing: int = 4  # about one fact per this many words of the first half (at most num_keys)
    query_spacing: int = 4  # about one recall per this many words of the second half

    def __post_init__(self):
        positive = ("num_keys", "num_values", "num_filler", "successors", "length_scale", "max_length",
                    "fact_spacing", "query_spacing")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"synthetic language: {name} must be >= 1, got {getattr(self, name)}")
        if self.successors > self.num_filler:
            raise ValueError(f"synthetic language: successors ({self.successors}) > num_filler ({self.num_filler})")
        if not 0.0 <= self.jump_probability <= 1.0:
            raise ValueError(f"synthetic language: jump_probability must be in [0, 1], got {self.jump_probability}")
        if self.pareto_shape <= 0:
            raise ValueError(f"synthetic language: pareto_shape must be > 0, got {self.pareto_shape}")
        if self.length_scale < 4 or self.max_length < self.length_scale:
            raise ValueError(f"synthetic language: need 4 <= length_scale ({self.length_scale}) <= max_length "
                             f"({self.max_length})")

    @classmethod
    def from_dict(cls, values: dict, where: str = "synthetic language") -> "LanguageConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        encoded = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


class SyntheticLanguage:
    """Words, the filler chain, document and probe-prompt generation of one :class:`LanguageConfig`."""

    def __init__(self, config: LanguageConfig = LanguageConfig()):
        self.config = config
        self.keys = [f"k{i}" for i in range(config.num_keys)]
        self.values = [f"v{i}" for i in range(config.num_values)]
        self.filler_words = [f"w{i}" for i in range(config.num_filler)]
        table = random.Random(f"filler-chain:{config.seed}")
        # Successor j of word i has probability proportional to 2^-j: a sparse, skewed chain.
        self.successor_table = [table.sample(range(config.num_filler), config.successors)
                                for _ in range(config.num_filler)]
        raw = [2.0 ** -j for j in range(config.successors)]
        self.successor_probabilities = [p / sum(raw) for p in raw]

    # -- vocabulary -------------------------------------------------------------------
    @property
    def vocabulary(self) -> List[str]:
        """Every token in id order: the special tokens first, then markers, keys, values, filler."""
        return [EOD_TOKEN, PAD_TOKEN, UNK_TOKEN, KEY_MARK, QUERY_MARK, *self.keys, *self.values, *self.filler_words]

    # -- text -------------------------------------------------------------------------
    def filler(self, rng: random.Random, n: int, previous: int | None = None) -> List[str]:
        """``n`` filler words continuing the chain from word index ``previous`` (random start if None)."""
        words = []
        state = rng.randrange(self.config.num_filler) if previous is None else previous
        for _ in range(n):
            if rng.random() < self.config.jump_probability:
                state = rng.randrange(self.config.num_filler)
            else:
                state = rng.choices(self.successor_table[state], self.successor_probabilities)[0]
            words.append(self.filler_words[state])
        return words

    def document_length(self, rng: random.Random) -> int:
        u = 1.0 - rng.random()  # (0, 1]
        length = self.config.length_scale * u ** (-1.0 / self.config.pareto_shape)
        return int(min(length, self.config.max_length))

    def document(self, index: int) -> List[str]:
        """Document ``index`` as a list of words (about ``document_length`` words; facts add a few)."""
        config = self.config
        rng = random.Random(f"document:{config.seed}:{index}")
        length = self.document_length(rng)
        half = length // 2
        num_facts = min(config.num_keys, max(1, round(half / config.fact_spacing)))
        num_queries = max(1, round((length - half) / config.query_spacing))
        fact_keys = rng.sample(range(config.num_keys), num_facts)
        fact_values = {key: rng.randrange(config.num_values) for key in fact_keys}
        # Slots: each event goes after a filler position; facts in [0, half), recalls in [half, length).
        events = {}
        for key, slot in zip(fact_keys, sorted(rng.sample(range(half), num_facts))):
            events.setdefault(slot, []).append((KEY_MARK, key))
        for slot in sorted(rng.choices(range(half, length), k=num_queries)):
            events.setdefault(slot, []).append((QUERY_MARK, rng.choice(fact_keys)))
        words, state = [], None
        for position in range(length):
            for mark, key in events.get(position, ()):
                words += [mark, self.keys[key], self.values[fact_values[key]]]
            filler = self.filler(rng, 1, state)
            state = int(filler[0][1:])
            words += filler
        return words

    def documents(self, count: int, start: int = 0) -> Iterator[str]:
        for index in range(start, start + count):
            yield " ".join(self.document(index))
