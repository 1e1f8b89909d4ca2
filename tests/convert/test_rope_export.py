"""Export writes the RoPE the model computes, in every spelling transformers reads, and refuses what a
HF config cannot express. (Trained runs with changed RoPE, exported and compared against transformers'
logits: tests/training/test_context_extension.py.)"""

import json
import shutil

import pytest
import torch

from megatron_exact.convert.hf_mapping import hf_config_dict
from megatron_exact.model.config import RopeScaling, arch_from_hf_config, get_preset
from tools.convert_checkpoint import main

LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024)
ARCHES = {
    "default": get_preset("tiny-qwen2").replace(rotary_base=40000.0),
    "linear": get_preset("tiny-qwen2").replace(rotary_seq_len_interpolation_factor=2.0),
    "llama3": get_preset("tiny-llama3").replace(rope_scaling=LLAMA3, rotary_base=123456.0),
}


def rewrite_arch_record(checkpoint_dir, **changes):
    """Edit the architecture a checkpoint records (its common state), as a stale or hand-edited record."""
    path = checkpoint_dir / "common.pt"
    common = torch.load(path, weights_only=False)
    common["model_arch"].update(changes)
    torch.save(common, path)


@pytest.mark.parametrize("name", list(ARCHES))
def test_exported_rope_reads_back_as_the_same_model(name):
    """The config re-imports as the architecture it was written from, and transformers' own config class
    reads the same RoPE from it (rope_parameters, which transformers 5 reads, and rope_scaling, which
    transformers 4 and vLLM read)."""
    from transformers import AutoConfig

    arch = ARCHES[name]
    config = hf_config_dict(arch, torch.float32)
    assert arch_from_hf_config(config) == arch
    assert config["rope_theta"] == arch.rotary_base
    if name == "default":
        assert "rope_scaling" not in config and config["rope_parameters"]["rope_type"] == "default"
    else:
        assert config["rope_scaling"] == config["rope_parameters"]
    if name == "linear":
        assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": arch.rotary_base}
    loaded = AutoConfig.for_model(**config)
    assert loaded.rope_parameters["rope_type"] == name
    assert loaded.rope_parameters["rope_theta"] == arch.rotary_base


def test_export_refuses_llama3_scaling_with_linear_interpolation(imported, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(imported["llama3"], checkpoint)
    rewrite_arch_record(checkpoint / "release", rotary_seq_len_interpolation_factor=2.0)
    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(checkpoint), "--hf-dir-out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot express both" in err and "--rotary-seq-len-interpolation-factor" in err
    assert not out.exists()


def test_export_max_position_embeddings_covers_the_trained_length(imported, tmp_path):
    """A record that predates the trainer raising max_position_embeddings: the recorded --seq-length wins."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(imported["qwen2-tied"], checkpoint)
    path = checkpoint / "release" / "common.pt"
    common = torch.load(path, weights_only=False)
    common["args"] = {"seq_length": 2048}
    torch.save(common, path)
    from megatron_exact.convert.exporter import export_hf

    out = export_hf(checkpoint, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 2048
