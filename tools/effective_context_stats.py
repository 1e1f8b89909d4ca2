"""Where does the supervision go? Supervised targets per effective-context bucket.

    python tools/effective_context_stats.py --data-path data/corpus_text_document --seq-length 4096 \
        --json stats.json --plot stats.png

Prints a table (count, share, cumulative share and the EXACT weight of every bucket,
and the share of the loss mass below seq_length/4); --json and --plot write it out.
Takes the trainer's data and EXACT flags with the trainer's defaults (``--split``
969,30,1: the train part is analysed; ``--seed`` 1234; ``--exact-alpha/-gamma/-eps/-tau``),
so the flags of a training command show the samples and weights that run sees.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_exact import cli  # noqa: E402


def get_args(argv=None):
    from megatron_exact.flags import add_data_args, add_exact_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    # The trainer's own definitions (and defaults): a training command's data and EXACT flags
    # give the samples and the weights that run sees; its other flags are refused.
    add_data_args(parser)
    add_exact_args(parser)
    group = parser.add_argument_group("stats")
    group.add_argument("--num-samples", type=int, default=None,
                       help="training samples to analyse (default: one epoch of the --split train part; required for "
                            "a weighted blend); a run reads --train-iters x --global-batch-size")
    group.add_argument("--json", default=None, help="write the table as JSON here")
    group.add_argument("--plot", default=None, help="write a histogram PNG here")
    return parser.parse_args(argv)


def _main(argv=None):
    args = get_args(argv)
    from megatron_exact.atomic_io import check_writable
    from megatron_exact.data.dataset import build_train_valid_test_datasets, parse_data_path, parse_split
    from megatron_exact.data.stats import effective_context_stats, format_table, plot, write_json
    from megatron_exact.data.tokenizers import build_tokenizer
    from megatron_exact.errors import UserError
    from megatron_exact.flags import exact_config_from_args

    if args.seq_length < 1:
        raise UserError(f"--seq-length must be positive, got {args.seq_length}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be positive, got {args.num_samples}")
    parse_split(args.split)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before hours of counting, not after
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise UserError(f"{flag} {path}: directory {parent} does not exist; create it or write elsewhere")
            try:
                check_writable(path, directory=False)
            except UserError as err:
                raise UserError(f"{flag} {path}: {err}") from None
    _, weights = parse_data_path(args.data_path)
    if weights is not None and args.num_samples is None:
        raise UserError("--num-samples is required with a weighted --data-path blend")
    exact = exact_config_from_args(args)  # checks the values, naming the flag
    exact.check_tail(args.seq_length)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.tokenizer_type else None
    train, _, _ = build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, args.seed, (args.num_samples, 0, 0),
        document_masking=args.document_masking, cache_path=args.data_cache_path, tokenizer=tokenizer,
    )
    if train is None or len(train) == 0:
        raise UserError(f"--split {args.split} with --seq-length {args.seq_length} leaves no training samples in "
                        f"{' '.join(args.data_path)}: a sample needs --seq-length + 1 tokens of the train part; "
                        "give a smaller --seq-length or more data")
    total = len(train) if args.num_samples is None else min(args.num_samples, len(train))

    def progress(done):
        print(f"  {done:,}/{total:,} samples", file=sys.stderr, flush=True)

    stats = effective_context_stats(train, args.num_samples, progress=progress if total > 65536 else None,
                                    alpha=exact.alpha, gamma=exact.gamma, eps=exact.eps, tau=exact.tau)
    stats.loss_weighting = exact.weighting
    stats.data_path = list(args.data_path)
    print(format_table(stats))
    print(f"({stats.num_samples * stats.seq_length / max(stats.seconds, 1e-12) / 1e6:.1f} M tokens/s)", file=sys.stderr)
    if args.json:
        write_json(stats, args.json)
    if args.plot:
        plot(stats, args.plot)
    return 0


def main(argv=None):
    return cli.run("effective_context_stats.py", _main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
