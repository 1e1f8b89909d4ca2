"""Standard QA (MMLU, ARC-Challenge, HellaSwag, WinoGrande, PIQA, GSM8K) through lm-evaluation-harness.

Not a re-implementation: a thin wrapper that runs the harness's ``simple_evaluate`` on a local HF
checkpoint directory, fully offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``), so a task runs
when its dataset is in the local HF datasets cache or the task reads local files (``--include-path``
with your own YAML). A task whose dataset is not available locally is named in the error, with
its dataset. The same run with the harness's own CLI::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=DIR \\
        --tasks arc_challenge,hellaswag --batch_size 8 --output_path OUT
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_exact import atomic_io
from megatron_exact.eval.backend import check_model_dir
from megatron_exact.errors import BadInputError

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _import_harness():
    for name, value in OFFLINE.items():
        os.environ[name] = value
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager, get_task_dict
        from lm_eval.utils import make_table
    except ImportError:
        raise BadInputError("lm-eval: lm-evaluation-harness is not installed; pip install -e '.[eval]'") from None
    return lm_eval, TaskManager, get_task_dict, make_table


def _dataset_of(manager, task: str) -> str:
    """'dataset X (subset)' from the harness's task index, for the message."""
    config = getattr(manager.task_index.get(task), "cfg", None) or {}
    dataset = config.get("dataset_path")
    if dataset and config.get("dataset_name"):
        dataset = f"{dataset} ({config['dataset_name']})"
    return f"dataset {dataset}" if dataset else "its dataset"


def run(model_dir, tasks: Sequence[str], *, output: Path, include_path: Optional[str] = None,
        num_fewshot: Optional[int] = None, batch_size: int = 8, limit: Optional[float] = None, device: str = "cpu",
        dtype: str = "auto") -> dict:
    path = check_model_dir(model_dir)
    if include_path is not None and not Path(include_path).is_dir():
        raise BadInputError(f"--include-path {include_path}: not a directory of lm-eval task YAML files")
    lm_eval, TaskManager, get_task_dict, make_table = _import_harness()
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (see `lm_eval --tasks list`"
                             + (f"; searched {include_path} too" if include_path else "") + ")")
    for task in tasks:
        try:
            get_task_dict([task], manager)
        except Exception as err:  # the harness and datasets raise many types for "not available offline"
            raise BadInputError(
                f"lm-eval task {task}: {_dataset_of(manager, task)} is not available offline "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download it into the "
                "HF datasets cache where there is internet, or give a task over local files with --include-path"
            ) from None
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(path), "dtype": dtype}, tasks=list(tasks), task_manager=manager,
        num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, device=device, log_samples=False,
    )
    output.mkdir(parents=True, exist_ok=True)
    record = {"model": str(path), "tasks": list(tasks), "results": results["results"],
              "n-samples": results.get("n-samples"), "versions": results.get("versions"),
              "config": {k: v for k, v in results.get("config", {}).items() if k != "model_args"}}
    atomic_io.write_text(output / "results.json", json.dumps(record, indent=2, default=str) + "\n")
    table = make_table(results)
    atomic_io.write_text(output / "table.md", f"# lm-eval: {path}\n\n{table}")
    print(table, flush=True)
    return record
