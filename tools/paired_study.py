"""Paired-run study: the CPT protocol as arms x seeds, evaluated, with confidence intervals in one report.

    python tools/paired_study.py --config examples/study/cpu_study.yaml
    python tools/paired_study.py --config study.yaml --launcher slurm     # write SLURM array jobs, then rerun
    python tools/paired_study.py --config study.yaml --report-only        # evaluate + report finished runs

Runs already finished (same flags, checkpoint at --train-iters) are not redone; interrupted ones
resume from their last checkpoint. Outputs: see megatron_exact/study/runner.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_exact import cli  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study file (YAML)")
    parser.add_argument("--output", help="study directory (default: the file's 'output')")
    parser.add_argument("--launcher", choices=("local", "commands", "slurm"),
                        help="run with torchrun here, or write the command lines / SLURM array jobs "
                             "(default: the file's launch.mode)")
    parser.add_argument("--plan", action="store_true", help="print the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="evaluate and report the finished runs")
    return parser.parse_args(argv)


def _main(argv=None):
    import warnings

    # Megatron-Core's notices about optional packages (Apex, TE) while exporting checkpoints.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    from megatron_exact.study import Study
    from megatron_exact.study.runner import run_state

    args = get_args(argv)
    study = Study.from_yaml(args.config, output=args.output, log=lambda message: print(message, flush=True))
    if args.plan:
        for run in study.runs():
            after = f" (from {run.depends_on})" if run.depends_on else ""
            print(f"{run.name:32s} {run_state(run):8s} {run.train_iters:6d} iterations{after}  {run.directory}")
        return 0
    if args.report_only:
        study.report()
        return 0
    study.run(args.launcher)
    return 0


def main(argv=None):
    return cli.run("paired_study.py", _main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
