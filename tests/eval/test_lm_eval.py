"""The lm-evaluation-harness wrapper, offline, with the real harness: a YAML task over a local JSONL file
made here, run on a tiny model; accuracy checked against the model's own log-likelihoods."""

import json

import pytest
import torch

from megatron_exact.eval.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is installed by `make test` (the test extra)")

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "The grass is", "choices": ["purple", "green"], "answer": 1},
    {"question": "Fog rolls in from the", "choices": ["sea", "desert"], "answer": 0},
    {"question": "Snow covers the northern", "choices": ["ridge", "kitchen"], "answer": 0},
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_qa.yaml").write_text(
        "task: tiny_local_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


def _choice_logprob(model, tokenizer, context, continuation):
    whole = tokenizer(context + " " + continuation)["input_ids"]
    prefix = tokenizer(context)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(prefix), len(whole)))


def test_harness_runs_a_local_task_offline(eval_models, local_task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["lm-eval", "--model", str(eval_models["a"]), "--tasks", "tiny_local_qa",
                 "--include-path", str(local_task), "--batch-size", "2", "--output", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    accuracy = results["results"]["tiny_local_qa"]["acc,none"]
    assert "tiny_local_qa" in (out / "table.md").read_text()
    # Independent check: the harness picks, per question, the choice with the highest log-likelihood.
    model = AutoModelForCausalLM.from_pretrained(str(eval_models["a"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(eval_models["a"]))
    correct = 0
    for doc in DOCS:
        scores = [_choice_logprob(model, tokenizer, doc["question"], c) for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert accuracy == pytest.approx(correct / len(DOCS))


def test_missing_dataset_and_unknown_task_are_named(capsys, eval_models, tmp_path):
    out = str(tmp_path / "out")
    assert main(["lm-eval", "--model", str(eval_models["a"]), "--tasks", "no_such_task_xyz", "--output", out]) == 1
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err
    assert main(["lm-eval", "--model", str(eval_models["a"]), "--tasks", "arc_challenge", "--output", out]) == 1
    err = capsys.readouterr().err
    assert "lm-eval task arc_challenge: dataset allenai/ai2_arc (ARC-Challenge) is not available offline" in err
