"""Split a preprocessed corpus into document-length buckets, for a length-upsampling --data-path blend.

    python tools/bucket_by_length.py --data-path data/corpus_text_document --output-prefix data/bylen \
        --edges 1024 4096 --upsample 1 2 4

Writes {output-prefix}_len{lo}-{hi}.bin/.idx (+ tokenizer sidecar) for each range of document lengths
(in tokens; the last range is open), every input document in exactly one of them, and prints the
--data-path blend that gives each bucket --upsample times its natural share of the tokens.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_exact import cli  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--output-prefix", required=True, help="path prefix of the bucketed datasets")
    parser.add_argument("--edges", type=int, nargs="+", required=True,
                        help="document-length bucket edges in tokens (0 is implied as the first edge)")
    parser.add_argument("--upsample", type=float, nargs="+",
                        help="one factor per bucket for the printed blend (default: 1 each, the natural mixture)")
    return parser.parse_args(argv)


def _main(argv=None):
    from megatron_exact.data.length_buckets import blend_data_path, blend_weights, split_by_length

    args = get_args(argv)
    buckets = split_by_length(args.data_path, args.output_prefix, args.edges)
    factors = args.upsample or [1.0] * len(buckets)
    weights = blend_weights(buckets, factors)
    print("--data-path " + " ".join(blend_data_path(buckets, weights)))
    return 0


def main(argv=None):
    return cli.run("bucket_by_length.py", _main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
