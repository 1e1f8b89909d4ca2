"""Paired-run studies: arms x seeds of the CPT protocol, confidence intervals, one report.

    from megatron_exact.study import Study
    study = Study.from_yaml("examples/study/cpu_study.yaml")
    summary = study.run()          # data, short stages, CPT arms, evaluation, report (skips what is done)

or step by step: ``study.train()``, ``study.evaluate()``, ``study.report()``. The command line is
``tools/paired_study.py --config study.yaml``.
"""

from megatron_exact.study.study import Study

__all__ = ["Study"]
