"""Write a small synthetic JSONL corpus for the tiny CPU example and the trainer tests.

Documents have Pareto-distributed lengths (many short, a few long, as in web
data), so effective contexts cover the whole window and EXACT's tail buckets
are populated. Text is a word-level Markov chain over a small vocabulary with
"key = value" facts recalled later in the same document: learnable by a tiny
byte-level model within a few dozen steps, with something to gain from long
context.

    python examples/tiny_cpu/make_corpus.py --output corpus.jsonl --documents 400
"""

import argparse
import json
import os
import random

WORDS = ("the a of to and in is it that was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know").split()
KEYS = [f"k{i}" for i in range(16)]
VALUES = [f"v{i}" for i in range(16)]


def document(rng: random.Random, n_words: int) -> str:
    facts = {}
    words, previous = [], rng.choice(WORDS)
    for position in range(n_words):
        if rng.random() < 0.03:
            if facts and position > n_words // 2 and rng.random() < 0.6:
                key = rng.choice(sorted(facts))
                words.append(f"recall {key} = {facts[key]} .")
            else:
                key, value = rng.choice(KEYS), rng.choice(VALUES)
                facts[key] = value
                words.append(f"fact {key} = {value} .")
            continue
        # Each word strongly prefers a few successors (locally predictable text).
        successor = WORDS[(WORDS.index(previous) * 7 + rng.choice((1, 2, 3, 5))) % len(WORDS)]
        previous = successor if rng.random() < 0.85 else rng.choice(WORDS)
        words.append(previous)
    return " ".join(words)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--pareto-shape", type=float, default=1.1, help="smaller: heavier tail of long documents")
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        for _ in range(args.documents):
            n_words = min(args.max_words, int(args.min_words * rng.paretovariate(args.pareto_shape)))
            f.write(json.dumps({"text": document(rng, n_words)}) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.documents} documents to {args.output}")


if __name__ == "__main__":
    main()
