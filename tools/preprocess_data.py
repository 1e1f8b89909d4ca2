"""Turn JSONL corpora into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

Flags follow Megatron-LM's tools/preprocess_data.py; see megatron_exact/data/preprocess.py
for what is the same (byte-identical document-level output) and what differs.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/to/hf_dir \
        --append-eod --workers 8
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_exact import cli  # noqa: E402
from megatron_exact.data.preprocess import UNREADABLE, BadInputError, PreprocessConfig, preprocess  # noqa: E402
from megatron_exact.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="HF tokenizer directory, SentencePiece .model or tiktoken vocabulary (not for ByteTokenizer)")
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", required=True,
                       help="a .jsonl/.jsonl.gz/.jsonl.zst file, a directory of them, or a glob")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; each gets its own .bin/.idx")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (nltk Punkt learned from the input; not byte-compatible with Megatron-LM)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="keep newlines between sentences when splitting")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="count and skip malformed lines instead of stopping at the first one")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the EOD token to every non-empty document")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the outputs, without suffix")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, required=True, help="tokenizer worker processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for Megatron-LM command-line compatibility (--workers must be a multiple); "
                            "input is always read as one ordered stream, so output does not depend on it")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron-LM compatibility; input order is always kept")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return parser.parse_args(argv)


def _main(argv=None):
    args = get_args(argv)
    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
    )
    try:
        preprocess(config)
    except BadInputError as err:
        if err.kind in (UNREADABLE, "no documents") or config.skip_bad_lines:
            raise
        raise BadInputError(f"{err} (fix the line, or pass --skip-bad-lines to count and skip such lines)",
                            err.kind) from None
    return 0


def main(argv=None):
    return cli.run("preprocess_data.py", _main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
