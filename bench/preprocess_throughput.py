"""Preprocessing throughput: our tools/preprocess_data.py vs Megatron-LM's, same input.

Generates a JSONL corpus and a byte-level BPE HF tokenizer trained on it, runs both
tools with the same tokenizer, flags and worker count, checks the outputs are
byte-identical and prints wall times and the throughput ratio. Start-up (imports,
tokenizer loading) is measured on a one-line corpus and reported separately.

    python bench/preprocess_throughput.py --megatron-lm /path/to/Megatron-LM --workers 1 2

Megatron-LM is a local checkout the user points to (never vendored). On a machine
without triton, its ``megatron.training`` import needs a stub; pass a directory
holding such shims with ``--megatron-lm-pythonpath`` (see BENCHMARKS.md).
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but its also after their first one two new been more other city most into during over some used "
    "model context token training long document sequence attention layer memory parallel gradient data "
    "language paper results method show large small table figure value per between both each than"
).split()


def make_corpus(path, documents, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(documents):
            n_words = int(rng.expovariate(1 / 400)) + 1
            sentences, words = [], []
            for _ in range(n_words):
                words.append(rng.choice(WORDS))
                if rng.random() < 0.07:
                    sentences.append(" ".join(words).capitalize() + ".")
                    words = []
            sentences.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sentences) + f" Document {i}."}) + "\n")


def make_tokenizer(corpus, out_dir, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out_dir)


def run(command, env=None):
    """(wall seconds, CPU seconds of the command and all its worker processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", help="local Megatron-LM checkout (tag core_v0.16.1); without it the "
                                              "comparison is skipped")
    parser.add_argument("--megatron-lm-pythonpath", default="", help="extra PYTHONPATH for Megatron-LM's tool")
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.megatron_lm is None:
        print("bench/preprocess_throughput.py: skipped, needs --megatron-lm (a local Megatron-LM checkout)")
        return

    mlm_tool = os.path.join(args.megatron_lm, "tools", "preprocess_data.py")
    if not os.path.isfile(mlm_tool):
        sys.exit(f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py there")
    python = sys.executable
    mlm_env = dict(os.environ, PYTHONPATH=args.megatron_lm_pythonpath)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_corpus(corpus, args.documents)
        one_line = os.path.join(tmp, "one.jsonl")
        with open(corpus) as f, open(one_line, "w") as g:
            g.write(f.readline())
        hf_dir = os.path.join(tmp, "tok")
        make_tokenizer(corpus, hf_dir, args.vocab_size)
        size_mb = os.path.getsize(corpus) / 2**20
        print(f"corpus: {args.documents} documents, {size_mb:.1f} MB; HF BPE tokenizer, vocab {args.vocab_size}; "
              f"{os.cpu_count()} CPU cores")
        print("wall = elapsed seconds; cpu = CPU seconds of the tool and its workers (robust on a shared machine);")
        print("'excl. start-up' subtracts the same tool's run on a one-line corpus.")
        print(f"{'workers':>7} {'wall ours':>9} {'wall MLM':>8} {'ratio':>6} | {'cpu ours':>8} {'cpu MLM':>8} {'ratio':>6} | "
              f"{'excl. start-up: cpu ours':>24} {'cpu MLM':>8} {'ratio':>6} {'ours MB/cpu-s':>13}")
        for workers in args.workers:
            def commands(inp, tag):
                common = ["--input", inp, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
                          "--append-eod", "--workers", str(workers), "--log-interval", "100000000"]
                ours = [python, os.path.join(REPO, "tools", "preprocess_data.py"), *common,
                        "--output-prefix", os.path.join(tmp, f"ours{tag}")]
                mlm = [python, mlm_tool, *common, "--output-prefix", os.path.join(tmp, f"mlm{tag}")]
                return ours, mlm

            ours_cmd, mlm_cmd = commands(corpus, "")
            ours_start_cmd, mlm_start_cmd = commands(one_line, "_one")
            t_ours, c_ours = min(run(ours_cmd) for _ in range(args.repeats))
            t_mlm, c_mlm = min(run(mlm_cmd, mlm_env) for _ in range(args.repeats))
            (_, s_ours), (_, s_mlm) = run(ours_start_cmd), run(mlm_start_cmd, mlm_env)
            for suffix in (".bin", ".idx"):
                a = open(os.path.join(tmp, "ours_text_document" + suffix), "rb").read()
                b = open(os.path.join(tmp, "mlm_text_document" + suffix), "rb").read()
                if a != b:
                    sys.exit(f"outputs differ ({suffix}) at {workers} workers")
            work_ours, work_mlm = max(c_ours - s_ours, 1e-9), max(c_mlm - s_mlm, 1e-9)
            print(f"{workers:>7} {t_ours:>9.2f} {t_mlm:>8.2f} {t_mlm / t_ours:>6.2f} | {c_ours:>8.2f} {c_mlm:>8.2f} "
                  f"{c_mlm / c_ours:>6.2f} | {work_ours:>24.2f} {work_mlm:>8.2f} {work_mlm / work_ours:>6.2f} "
                  f"{size_mb / work_ours:>13.2f}")
        print("outputs byte-identical: yes")


if __name__ == "__main__":
    main()
