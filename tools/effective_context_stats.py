"""Where does the supervision go? Supervised targets per effective-context bucket.

    python tools/effective_context_stats.py --data-path data/corpus_text_document --seq-length 4096 \
        --json stats.json --plot stats.png

Prints a table (count, share, cumulative share and the EXACT weight of every bucket,
and the share of the loss mass below seq_length/4); --json and --plot write it out.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="dataset prefix(es) or a Megatron blend 'w1 prefix1 w2 prefix2'")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples to analyse (default: one epoch; required for a weighted blend)")
    parser.add_argument("--split", default="100,0,0", help="Megatron --split; the train part is analysed")
    parser.add_argument("--seed", type=int, default=1234, help="Megatron --seed (sample shuffling)")
    parser.add_argument("--no-document-masking", action="store_true",
                        help="positions 0..S-1 over the whole sample (Megatron-LM without --reset-position-ids)")
    parser.add_argument("--tokenizer-type", default=None, help="only for data without a tokenizer sidecar")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--data-cache-path", default=None, help="Megatron --data-cache-path for the sample indices")
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    parser.add_argument("--plot", default=None, help="write a histogram PNG here")
    return parser.parse_args(argv)


def _main(argv=None):
    args = get_args(argv)
    from megatron_exact.data.dataset import build_train_valid_test_datasets, parse_data_path
    from megatron_exact.data.stats import effective_context_stats, format_table, plot, write_json
    from megatron_exact.data.tokenizers import build_tokenizer
    from megatron_exact.errors import UserError

    _, weights = parse_data_path(args.data_path)
    if weights is not None and args.num_samples is None:
        raise UserError("--num-samples is required with a weighted --data-path blend")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.tokenizer_type else None
    train, _, _ = build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, args.seed, (args.num_samples, 0, 0),
        document_masking=not args.no_document_masking, cache_path=args.data_cache_path, tokenizer=tokenizer,
    )
    if train is None:
        raise UserError(f"--split {args.split} leaves no training samples")
    total = len(train) if args.num_samples is None else min(args.num_samples, len(train))

    def progress(done):
        print(f"  {done:,}/{total:,} samples", file=sys.stderr, flush=True)

    stats = effective_context_stats(train, args.num_samples, progress=progress if total > 65536 else None)
    stats.data_path = list(args.data_path)
    print(format_table(stats))
    print(f"({stats.num_samples * stats.seq_length / max(stats.seconds, 1e-12) / 1e6:.1f} M tokens/s)", file=sys.stderr)
    if args.json:
        write_json(stats, args.json)
    if args.plot:
        plot(stats, args.plot)
    return 0


def main(argv=None):
    from megatron_exact import cli

    return cli.run("effective_context_stats.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
