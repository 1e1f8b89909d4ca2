"""Unsupported or broken inputs fail through the CLI with a message naming what is wrong, writing nothing."""

import json
import shutil

import pytest

from tools.convert_checkpoint import main


def edited_copy(source, tmp_path, edit_config=None):
    target = tmp_path / "hf"
    shutil.copytree(source, target)
    if edit_config:
        path = target / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    return target


def run_import(hf_dir, save, *extra):
    return main(["import-hf", "--hf-dir", str(hf_dir), "--save", str(save), *extra])


CONFIG_CASES = {
    "other architecture": (lambda c: c.update(model_type="gemma2"), "model_type 'gemma2' is not supported"),
    "mixture of experts": (lambda c: c.update(num_experts=4), "mixture-of-experts"),
    "rope type": (
        lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
        "rope_parameters type 'yarn' is not supported",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_unsupported_configs(case, hf_models, tmp_path, capsys):
    edit, message = CONFIG_CASES[case]
    hf_dir = edited_copy(hf_models["qwen2-tied"], tmp_path, edit)
    assert run_import(hf_dir, tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert message in err and str(hf_dir / "config.json") in err
    assert not (tmp_path / "ckpt").exists()


def test_missing_shard_message(hf_models, tmp_path, capsys):
    hf_dir = edited_copy(hf_models["qwen2-tied"], tmp_path)
    (hf_dir / "model-00002-of-00004.safetensors").unlink()
    assert run_import(hf_dir, tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert "names shard(s) missing" in err and "model-00002-of-00004.safetensors" in err
    assert not (tmp_path / "ckpt").exists()


def test_pickle_only_checkpoint(hf_models, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(hf_models["llama3"] / "config.json", hf_dir)
    (hf_dir / "pytorch_model.bin").write_bytes(b"not used")
    assert run_import(hf_dir, tmp_path / "ckpt") == 1
    assert "PyTorch pickles are not supported" in capsys.readouterr().err


def test_missing_and_unknown_tensors(hf_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf_dir = edited_copy(hf_models["llama3"], tmp_path)
    state = load_file(str(hf_dir / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(hf_dir / "model.safetensors"))
    assert run_import(hf_dir, tmp_path / "ckpt") == 1
    assert "tensors missing from the checkpoint: model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err

    state = load_file(str(hf_dir / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].clone()
    state["model.layers.0.self_attn.q_norm.weight"] = state["model.norm.weight"].clone()
    save_file(state, str(hf_dir / "model.safetensors"))
    assert run_import(hf_dir, tmp_path / "ckpt") == 1
    assert "does not know how to map: model.layers.0.self_attn.q_norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide the model's 4 attention heads"),
        (["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4 does not divide the model's 2 key/value groups"),
        (["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size 3 does not divide the model's 2 layers"),
    ],
)
def test_bad_parallel_layout(flags, message, hf_models, tmp_path, capsys):
    assert run_import(hf_models["qwen2-tied"], tmp_path / "ckpt", *flags) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_existing_outputs_and_missing_checkpoint(hf_models, imported, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert run_import(hf_models["llama3"], tmp_path / "taken") == 1
    assert "--save" in capsys.readouterr().err
    assert main(["export-hf", "--load", str(tmp_path / "taken"), "--hf-dir-out", str(tmp_path / "out")]) == 1
    assert "no latest_checkpointed_iteration.txt" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    assert main(["export-hf", "--load", str(imported["llama3"]), "--hf-dir-out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--hf-dir-out" in err and "already exists" in err
