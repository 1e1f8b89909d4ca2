#!/usr/bin/env python
"""Convert checkpoints between HF (Qwen2/2.5, LLaMA-3.x, Qwen3, Mistral) and Megatron-Core ``torch_dist``, on CPU.

  python tools/convert_checkpoint.py import-hf --hf-dir DIR --save CKPT \\
      [--tensor-model-parallel-size N] [--pipeline-model-parallel-size M] [--verify]
  python tools/convert_checkpoint.py export-hf --load CKPT --hf-dir-out DIR \\
      [--tokenizer-dir T] [--dtype bf16|fp32] [--verify]
  python tools/convert_checkpoint.py verify-hf --load CKPT --hf-dir DIR

--verify (and verify-hf, for a HF directory written earlier) compares the HF model
with the checkpoint rebuilt as a Megatron model and, for a trainer checkpoint, with
the probe logits the training process saved next to it.

One process, no launcher, no GPU, never contacts a model hub.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_exact import cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import-hf", help="HF directory -> torch_dist checkpoint ({save}/release)")
    imp.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    imp.add_argument("--save", required=True, help="new checkpoint directory to write")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP the checkpoint will be trained at: validated against the model, sets vocabulary padding")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="PP the checkpoint will be trained at (validated against the number of layers)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this x TP, as the trainer does")

    exp = commands.add_parser("export-hf", help="torch_dist checkpoint -> HF directory")
    exp.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt) or an iter_*/release dir")
    exp.add_argument("--hf-dir-out", required=True, help="new HF directory to write")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="copy tokenizer files from here (default: the HF dir the checkpoint was imported from, if present)")
    exp.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                     help="weight dtype of the export (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size, with an index (e.g. 5GB, 500MB)")

    ver = commands.add_parser("verify-hf", help="check a HF directory against a checkpoint (what --verify does)")
    ver.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt) or an iter_*/release dir")
    ver.add_argument("--hf-dir", required=True, help="HF directory to check (its config.json and weights alone)")

    for sub in (imp, exp):
        sub.add_argument("--verify", action="store_true",
                         help="compare Megatron and HF logits on random tokens (fp32, CPU); fail above --verify-tolerance")
    for sub in (imp, exp, ver):
        sub.add_argument("--verify-tolerance", type=float, default=1e-3, help="max abs logit difference allowed by --verify")
    return parser.parse_args(argv)


def _main(argv=None):
    args = parse_args(argv)
    if args.command == "import-hf":
        from megatron_exact.convert.importer import import_hf

        result = import_hf(
            args.hf_dir,
            args.save,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            verify=args.verify,
            verify_tolerance=args.verify_tolerance,
        )
    elif args.command == "verify-hf":
        from megatron_exact.checkpoint import resolve_checkpoint
        from megatron_exact.convert.verify import verify_export
        from megatron_exact.platform.distributed import initialize_model_parallel

        result, _ = resolve_checkpoint(args.load)
        initialize_model_parallel(1, 1, 1)
        verify_export(result, args.hf_dir, tolerance=args.verify_tolerance)
    else:
        from megatron_exact.convert.exporter import export_hf

        result = export_hf(
            args.load,
            args.hf_dir_out,
            tokenizer_dir=args.tokenizer_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            verify=args.verify,
            verify_tolerance=args.verify_tolerance,
        )
    print(f"{args.command}: done -> {result}")
    return 0


def main(argv=None):
    return cli.run("convert_checkpoint.py", _main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
