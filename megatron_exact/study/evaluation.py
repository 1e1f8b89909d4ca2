"""Evaluating a study's final checkpoints: HF export, the distance probe, validation loss per bucket.

:func:`evaluate_run` is the one place the study calls the evaluation suite.
Until the suite's probe (``megatron_exact.eval``) is available, the probe here
is the suite's definition restricted to single-token answers, scored on the
synthetic language itself (its Markov filler): for each distance ``d`` and
sample, a prompt of ``length`` tokens ``... KEY k v <d filler words> QUERY k``
is run once; the sample is correct when ``v`` has the highest next-token
log-probability among the value words, and its margin is that log-probability
minus the best other value's. The same prompt without the fact (ablated) shows
what the model guesses without evidence (chance is 1 / number of values).
Output cells have the suite's fields (``length``, ``distance``, ``n``,
``accuracy_present``, ``margin_present``, ``accuracy_ablated``, ``margin_ablated``).
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Optional

from megatron_exact import atomic_io
from megatron_exact.study.config import Evaluation
from megatron_exact.synthetic.language import LanguageConfig, SyntheticLanguage

EVAL_FILE = "eval.json"


def export_run(checkpoints: str, hf_dir: str, tokenizer_dir: Optional[str], dtype: Optional[str] = None) -> str:
    """``export-hf`` of the run's last checkpoint (skipped when already exported from that checkpoint)."""
    from megatron_exact.checkpoint import find_checkpoint
    from megatron_exact.convert.exporter import export_hf

    found = find_checkpoint(checkpoints)
    stamp = {"checkpoint": str(found[0]) if found else None, "iteration": found[1] if found else None}
    stamp_path = os.path.join(hf_dir, "exported_from.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return hf_dir
    if os.path.exists(hf_dir):
        import shutil

        shutil.rmtree(hf_dir)
    export_hf(checkpoints, hf_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    atomic_io.write_json(stamp_path, stamp)
    return hf_dir


def probe(hf_dir: str, language: SyntheticLanguage, evaluation: Evaluation,
          progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Distance-probe cells (see the module docstring) for every probe length and distance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    value_ids = torch.tensor(tokenizer.convert_tokens_to_ids(language.values))
    cells = []
    batch = 32
    for length in evaluation.probe_lengths:
        for distance in evaluation.probe_distances:
            results = {"present": [], "ablated": []}
            prompts = {"present": [], "ablated": []}
            answers = []
            for index in range(evaluation.probe_samples):
                rng_seed = f"probe:{evaluation.probe_seed}:{index}"
                words, answer = language.probe_prompt(random.Random(rng_seed), length, distance)
                ablated, _ = language.probe_prompt(random.Random(rng_seed), length, distance, evidence=False)
                prompts["present"].append(tokenizer.convert_tokens_to_ids(words))
                prompts["ablated"].append(tokenizer.convert_tokens_to_ids(ablated))
                answers.append(language.values.index(answer))
            for variant, ids in prompts.items():
                for start in range(0, len(ids), batch):
                    chunk = torch.tensor(ids[start:start + batch])
                    with torch.no_grad():
                        logits = model(chunk).logits[:, -1, :].float()
                    scores = torch.log_softmax(logits, dim=-1)[:, value_ids]
                    for row, answer in zip(scores, answers[start:start + batch]):
                        others = torch.cat([row[:answer], row[answer + 1:]])
                        margin = float(row[answer] - others.max())
                        results[variant].append((margin > 0, margin))
            cell = {"sweep": "distance", "length": length, "distance": distance, "n": len(answers)}
            for variant, rows in results.items():
                cell[f"accuracy_{variant}"] = sum(correct for correct, _ in rows) / len(rows)
                cell[f"margin_{variant}"] = sum(margin for _, margin in rows) / len(rows)
            cells.append(cell)
            if progress:
                progress(f"probe length {length} distance {distance}: accuracy {cell['accuracy_present']:.3f} "
                         f"(ablated {cell['accuracy_ablated']:.3f})")
    return cells


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
                 language: Optional[LanguageConfig], evaluation: Optional[Evaluation],
                 log: Callable[[str], None] = print) -> Dict:
    """Export and evaluate one finished run; writes and returns ``{run_dir}/eval.json`` (reused when the
    checkpoint and evaluation settings are unchanged)."""
    path = os.path.join(run_dir, EVAL_FILE)
    settings = {"evaluation": evaluation.__dict__ if evaluation else None,
                "language": language.to_dict() if language else None}
    hf_dir = os.path.join(run_dir, "hf")
    if evaluation is not None:
        export_run(checkpoints, hf_dir, tokenizer_dir, evaluation.export_dtype)
    stamp_path = os.path.join(hf_dir, "exported_from.json")
    stamp = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("settings") == settings and previous.get("exported_from") == stamp:
            return previous
    result = {"settings": settings, "exported_from": stamp, "validation": last_validation(metrics_file)}
    if evaluation is not None and language is not None:
        result["probe"] = probe(hf_dir, SyntheticLanguage(language), evaluation, progress=log)
    atomic_io.write_json(path, result)
    return result
