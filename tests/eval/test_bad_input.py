"""Bad input to the evaluation CLI: one line naming the file or flag and what to do, exit status 1."""

import json
import shutil

import pytest

from megatron_exact.eval.cli import main


def _error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron_exact.eval: error: "), err
    return err[0]


@pytest.fixture
def incomplete_models(eval_models, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(eval_models["a"], no_config)
    (no_config / "config.json").unlink()
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(eval_models["a"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    return no_config, no_tokenizer


def test_model_directory_without_config_or_tokenizer(capsys, incomplete_models, eval_models, tmp_path):
    no_config, no_tokenizer = incomplete_models
    out = str(tmp_path / "out")
    line = _error(capsys, ["ruler", "--model", str(no_config), "--lengths", "512", "--output", out])
    assert f"--model {no_config}: no config.json" in line and "export-hf" in line
    line = _error(capsys, ["probe", "--model", str(eval_models["a"]), "--model-b", str(no_tokenizer),
                           "--lengths", "512", "--output", out])
    assert f"--model-b {no_tokenizer}: no tokenizer" in line and "--tokenizer-dir" in line
    line = _error(capsys, ["ruler", "--model", str(tmp_path / "nowhere"), "--output", out])
    assert "not a directory" in line
    assert not (tmp_path / "out").exists()  # nothing written


def test_length_beyond_the_model_limit(capsys, eval_models, tmp_path):
    line = _error(capsys, ["ruler", "--model", str(eval_models["a"]), "--lengths", "1024", "4096", "8192",
                           "--output", str(tmp_path / "out")])
    assert "--lengths 4096 8192: longer than the model's limit of 2048 tokens" in line
    assert "config.json" in line and "--allow-extrapolation" in line
    line = _error(capsys, ["probe", "--model", str(eval_models["a"]), "--lengths", "512", "--length", "3000",
                           "--output", str(tmp_path / "out")])
    assert "3000" in line and "--allow-extrapolation" in line


def test_extrapolation_when_asked(eval_models, tmp_path):
    from megatron_exact.eval.backend import check_lengths

    check_lengths(eval_models["a"], [4096], allow_extrapolation=True)  # no error
    assert main(["probe", "--model", str(eval_models["a"]), "--lengths", "2100", "--distances", "8",
                 "--mirror-distance", "-1", "--num-samples", "1", "--allow-extrapolation",
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 0


def test_unknown_task_and_bad_numbers(capsys, eval_models, tmp_path):
    base = ["--model", str(eval_models["a"]), "--output", str(tmp_path / "out")]
    line = _error(capsys, ["ruler", *base, "--lengths", "512", "--tasks", "niah_single_1", "qa_9"])
    assert "--tasks: unknown task(s) qa_9; known: niah_single_1" in line
    line = _error(capsys, ["ruler", *base, "--lengths", "0", "512"])
    assert "--lengths 0: must be positive" in line
    line = _error(capsys, ["ruler", *base, "--lengths", "512", "--tasks", "niah_single_2"])
    assert "need --haystack-file" in line
    line = _error(capsys, ["ruler", *base, "--lengths", "512", "--haystack-file", str(tmp_path / "essay.txt"),
                           "--tasks", "niah_single_2"])
    assert "--haystack-file" in line and "no such file" in line
    line = _error(capsys, ["nolima", *base, "--lengths", "512", "--depths", "150"])
    assert "--depths 150.0: must lie in [0, 100]" in line


def test_malformed_spec_and_needle_set(capsys, eval_models, tmp_path):
    base = ["--model", str(eval_models["a"]), "--output", str(tmp_path / "out"), "--lengths", "512"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"format": "megatron_exact.probe_spec", "version": 1, "name": "x",
                                "fact": "{key} is here", "question": "where is {key}?", "keys": ["a"],
                                "answers": ["b", "c"], "filler": {"type": "sentences", "sentences": ["s."]}}))
    line = _error(capsys, ["probe", *base, "--spec", str(spec)])
    assert f"task specification {spec}: field 'fact' must contain {{answer}}" in line
    line = _error(capsys, ["ruler", *base, "--spec", str(spec)])
    assert str(spec) in line
    nolima_dir = tmp_path / "nolima"
    (nolima_dir / "needlesets").mkdir(parents=True)
    (nolima_dir / "needlesets" / "needle_set.json").write_text('[{"id": "1", "needle": 3}]')
    line = _error(capsys, ["nolima", *base, "--nolima-dir", str(nolima_dir)])
    assert "needle_set.json, entry '1': field 'needle' missing or not a str" in line
