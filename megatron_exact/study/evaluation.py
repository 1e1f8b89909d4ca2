"""Evaluating a study's final checkpoints: HF export, the distance probe, RULER-style tasks, loss per bucket.

:func:`evaluate_run` is the one place the study calls the evaluation suite
(``megatron_exact.eval``): the run's last checkpoint is exported with
``export-hf`` (tokenizer included), the distance-resolved probe of the suite
runs on it with the corpus's task specification (the fact at each distance
in the specification's filler, accuracy and margin with the fact present and
ablated, per distance cell), so do the RULER-style tasks the specification
expresses (key-value retrieval; variable tracking when it has that section;
greedy generation at the trained and an extrapolated length, RULER's
string-match score per task and length), and the last validation record of
the run's metrics file gives the unweighted loss per effective-context bucket.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

from megatron_exact import atomic_io
from megatron_exact.study.config import Evaluation

EVAL_FILE = "eval.json"


def export_run(checkpoints: str, hf_dir: str, tokenizer_dir: Optional[str], dtype: Optional[str] = None) -> str:
    """``export-hf`` of the run's last checkpoint (skipped when already exported from that checkpoint)."""
    from megatron_exact.checkpoint import find_checkpoint
    from megatron_exact.convert.exporter import export_hf

    found = find_checkpoint(checkpoints)
    stamp = {"checkpoint": str(found[0]) if found else None, "iteration": found[1] if found else None}
    stamp_path = os.path.join(hf_dir, "exported_from.json")
    if os.path.exists(stamp_path) and _read_json(stamp_path) == stamp:
        return hf_dir
    if os.path.exists(hf_dir):
        import shutil

        shutil.rmtree(hf_dir)
    export_hf(checkpoints, hf_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    atomic_io.write_json(stamp_path, stamp)
    return hf_dir


def probe(model, spec, evaluation: Evaluation, progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """The suite's distance probe (``megatron_exact.eval.probe``) of ``model`` (an ``HFModel``) with the task
    specification ``spec`` at every probe length: one cell per (length, distance) with ``accuracy_present``,
    ``margin_present``, ``accuracy_ablated``, ``margin_ablated``."""
    from megatron_exact.eval.probe import distance_sweep, score_samples, summarize

    cells = []
    for length in evaluation.probe_lengths:
        samples = distance_sweep(spec, model, length=length, distances=evaluation.probe_distances,
                                 num_samples=evaluation.probe_samples, seed=evaluation.probe_seed)
        for cell in summarize(score_samples(model, samples)):
            cells.append(cell)
            if progress:
                progress(f"probe length {length} distance {cell['distance']}: accuracy {cell['accuracy_present']:.3f} "
                         f"(fact removed {cell['accuracy_ablated']:.3f})")
    return cells


def ruler(model, spec, evaluation: Evaluation, progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """The suite's RULER-style tasks written in the corpus's language (``megatron_exact.eval.ruler``
    with the task specification: key-value retrieval in filler and among other facts, variable
    tracking when the specification has it), greedy generation at every RULER length: one cell per
    (task, length) with ``n`` and ``score`` (RULER's string-match score, 0-1)."""
    from megatron_exact.eval import ruler as ruler_tasks
    from megatron_exact.eval.suites import generate_and_score, ruler_samples

    tasks = evaluation.ruler_tasks
    if tasks is None:  # every task the specification expresses
        tasks = [t for t in ruler_tasks.SPEC_TASKS if t != "vt" or spec.variable_tracking is not None]
    if not tasks or not evaluation.ruler_lengths:
        return []
    samples = ruler_samples(model, tasks, evaluation.ruler_lengths, num_samples=evaluation.ruler_samples,
                            seed=evaluation.ruler_seed, spec=spec, haystack_text=None,
                            max_new_tokens=evaluation.ruler_max_new_tokens)
    records = generate_and_score(model, samples, batch_size=8)
    cells = []
    for task in tasks:
        for length in evaluation.ruler_lengths:
            scores = [r["score"] for r in records if r["task"] == task and r["length"] == length]
            cells.append({"task": task, "length": length, "n": len(scores), "score": sum(scores) / len(scores)})
            if progress:
                progress(f"ruler {task} length {length}: score {cells[-1]['score']:.3f}")
    return cells


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def last_validation(metrics_file: str) -> Optional[dict]:
    """The last validation line of a metrics file (unweighted CE overall and per effective-context bucket)."""
    last = None
    with open(metrics_file) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("split") == "valid":
                    last = record
    return last


def evaluate_run(run_dir: str, checkpoints: str, metrics_file: str, *, tokenizer_dir: Optional[str],
                 probe_spec: Optional[str], evaluation: Optional[Evaluation],
                 log: Callable[[str], None] = print) -> Dict:
    """Export and evaluate one finished run; writes and returns ``{run_dir}/eval.json`` (reused when the
    checkpoint and evaluation settings are unchanged)."""
    path = os.path.join(run_dir, EVAL_FILE)
    settings = {"evaluation": evaluation.__dict__ if evaluation else None,
                "probe_spec": _read_json(probe_spec) if probe_spec else None}
    hf_dir = os.path.join(run_dir, "hf")
    if evaluation is not None:
        export_run(checkpoints, hf_dir, tokenizer_dir, evaluation.export_dtype)
    stamp_path = os.path.join(hf_dir, "exported_from.json")
    stamp = _read_json(stamp_path) if os.path.exists(stamp_path) else None
    if os.path.exists(path):
        previous = _read_json(path)
        if previous.get("settings") == settings and previous.get("exported_from") == stamp:
            return previous
    result = {"settings": settings, "exported_from": stamp, "validation": last_validation(metrics_file)}
    if evaluation is not None and probe_spec is not None:
        from megatron_exact.eval.backend import HFModel
        from megatron_exact.eval.spec import load_spec

        model, spec = HFModel(hf_dir, dtype="float32"), load_spec(probe_spec)
        result["probe"] = probe(model, spec, evaluation, progress=log)
        result["ruler"] = ruler(model, spec, evaluation, progress=log)
    atomic_io.write_json(path, result)
    return result
