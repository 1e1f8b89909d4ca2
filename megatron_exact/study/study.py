"""The study as one object: configuration -> data -> runs -> evaluation -> report."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional

from megatron_exact.study.config import StudyConfig, load_study_config
from megatron_exact.study.evaluation import evaluate_run
from megatron_exact.study.report import RunResult, read_run_result, write_report
from megatron_exact.study.runner import Run, StudyData, StudyRunError, plan, prepare_data, run_state, run_study


class Study:
    def __init__(self, config: StudyConfig, log: Callable[[str], None] = print):
        self.config, self.log = config, log
        self._data: Optional[StudyData] = None

    @classmethod
    def from_yaml(cls, path: str, output: Optional[str] = None, log: Callable[[str], None] = print) -> "Study":
        config = load_study_config(path)
        if output is not None:
            config = dataclasses.replace(config, output=os.path.abspath(output))
        return cls(config, log)

    @property
    def data(self) -> StudyData:
        if self._data is None:
            self._data = prepare_data(self.config, log=self.log)
        return self._data

    def runs(self) -> List[Run]:
        return plan(self.config, self.data)

    def exposure(self) -> str:
        """Where the CPT data's supervision falls by effective context (the stats tool's table, JSON and
        histogram under ``{output}/data/``): how little of it reaches long contexts under uniform weighting."""
        from megatron_exact.data.dataset import build_train_valid_test_datasets
        from megatron_exact.data.stats import effective_context_stats, format_table, plot, write_json

        seq_length = int(self.config.cpt["seq-length"])
        train, _, _ = build_train_valid_test_datasets(
            self.data.data_path, "100,0,0", seq_length, self.config.seeds[0], (None, 0, 0),
            document_masking="no-document-masking" not in self.config.cpt,
            cache_path=os.path.join(self.config.output, "data", "index_cache"))
        stats = effective_context_stats(train)
        stats.data_path = list(self.data.data_path)
        table = format_table(stats)
        prefix = os.path.join(self.config.output, "data", f"effective_context_{seq_length}")
        write_json(stats, prefix + ".json")
        plot(stats, prefix + ".png")
        self.log(f"effective context of the CPT data at --seq-length {seq_length} ({prefix}.png):\n{table}")
        return table

    def train(self, mode: Optional[str] = None) -> List[Run]:
        """Run every missing run (locally), or write the launch scripts (``commands``/``slurm``)."""
        return run_study(self.config, mode=mode, data=self.data, log=self.log)

    def finished_cpt_runs(self) -> List[Run]:
        runs = [r for r in self.runs() if r.arm is not None]
        missing = [r.name for r in runs if run_state(r) != "done"]
        if missing:
            raise StudyRunError(f"{len(missing)} run(s) not finished yet: {', '.join(missing)}; train them first "
                                "(tools/paired_study.py without --report-only)")
        return runs

    def evaluate(self) -> List[RunResult]:
        """Export and evaluate every CPT run (reusing earlier evaluations of the same checkpoints)."""
        runs = self.finished_cpt_runs()
        results = []
        for number, run in enumerate(runs, 1):
            start = time.time()
            self.log(f"[eval {number}/{len(runs)}] {run.name}")
            evaluate_run(run.directory, run.save, run.metrics, tokenizer_dir=self.data.tokenizer_dir,
                         probe_spec=self.data.probe_spec, evaluation=self.config.evaluation,
                         log=lambda message: self.log(f"  [{run.name}] {message}"))
            results.append(read_run_result(run.directory, run.arm, run.seed, run.data_arm))
            self.log(f"[eval {number}/{len(runs)}] {run.name}: {time.time() - start:.0f} s")
        return results

    def report(self, results: Optional[List[RunResult]] = None, out_dir: Optional[str] = None) -> dict:
        results = results if results is not None else self.evaluate()
        out_dir = out_dir or os.path.join(self.config.output, "report")
        config = self.config
        cpt = f"CPT at {config.cpt['seq-length']} tokens for {config.cpt['train-iters']} iterations per arm and seed"
        if config.short_stage:
            protocol = (f"short-context stage at {config.short_stage['seq-length']} tokens for "
                        f"{config.short_stage['train-iters']} iterations per seed, then {cpt} from it")
        else:
            protocol = f"{cpt} from {config.start_checkpoint}"
        notes = [f"protocol: {protocol}", f"study file: `{config.source}`"]
        summary = write_report(results, out_dir, f"Paired study: {config.name}", notes)
        self.log(f"report: {os.path.join(out_dir, 'report.md')} (plots: {', '.join(summary['plots'])})")
        return summary

    def run(self, mode: Optional[str] = None) -> Optional[dict]:
        """Everything: train what is missing, then evaluate and report (local mode); in ``commands``/``slurm``
        mode write the launch scripts and stop (rerun after the jobs to evaluate and report)."""
        if (mode or self.config.launch.mode) == "local":
            self.exposure()
        self.train(mode)
        if (mode or self.config.launch.mode) != "local":
            return None
        summary = self.report()
        with open(os.path.join(self.config.output, "report", "report.md")) as f:
            self.log(f.read())
        self.log(f"outputs: {os.path.join(self.config.output, 'report')} (report.md, report.json, plots)")
        return summary
