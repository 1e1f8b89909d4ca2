"""HF -> Megatron -> HF conversion in one process (TP=1): logits, bit-exact round trip, generate, errors.

References are independent of our code: transformers' own models (logits,
greedy generation, loading the export) and the ``safetensors`` package
(reading both the original and the exported weights).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.tiny_hf_models import MODELS, build_hf_model, hf_config

TOL = 1e-4


def hf_state(directory):
    """All tensors of a HF directory, read with the safetensors package."""
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_logits_match_transformers_on_packed_documents(name, hf_models, imported):
    from megatron_exact.convert.megatron_checkpoint import build_model_for_checkpoint, load_model_weights, read_checkpoint_header
    from megatron_exact.convert.verify import hf_logits, megatron_logits, random_documents

    checkpoint = imported[name] / "release"
    arch, padded_vocab, _ = read_checkpoint_header(checkpoint)
    # One-token documents and odd lengths; HF runs each document separately.
    documents = random_documents(arch.vocab_size, [1, 29, 3, 64, 1], seed=1)
    model = build_model_for_checkpoint(arch, padded_vocab, seq_length=98)
    load_model_weights(model, checkpoint)
    ours = megatron_logits(model.eval(), documents, arch.vocab_size)
    reference = hf_logits(load_hf(hf_models[name]), documents)
    assert ours.shape == reference.shape == (98, arch.vocab_size)
    assert (ours - reference).abs().max().item() <= TOL


def test_llama3_rope_scaling_changes_logits(hf_models, imported):
    """The llama3 comparison above is sensitive to RoPE scaling: without it, HF logits differ clearly."""
    from megatron_exact.convert.megatron_checkpoint import build_model_for_checkpoint, load_model_weights, read_checkpoint_header
    from megatron_exact.convert.verify import hf_logits, megatron_logits, random_documents

    checkpoint = imported["llama3"] / "release"
    arch, padded_vocab, _ = read_checkpoint_header(checkpoint)
    documents = random_documents(arch.vocab_size, [64], seed=2)
    model = build_model_for_checkpoint(arch, padded_vocab, seq_length=64)
    load_model_weights(model, checkpoint)
    ours = megatron_logits(model.eval(), documents, arch.vocab_size)
    unscaled = load_hf(hf_models["llama3"])
    unscaled_config = hf_config("llama3", rope_scaling=None)
    plain = build_hf_model(unscaled_config)
    plain.load_state_dict(unscaled.state_dict())
    assert (ours - hf_logits(plain, documents)).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(name, hf_models, imported, tmp_path):
    from megatron_exact.convert.exporter import export_hf

    # A tiny shard limit forces the sharded layout with an index.
    out = export_hf(imported[name], tmp_path / "out", max_shard_size="60KB")
    original, exported = hf_state(hf_models[name]), hf_state(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert len(set(index["weight_map"].values())) > 1

    config = json.loads((out / "config.json").read_text())
    source = json.loads((hf_models[name] / "config.json").read_text())
    for key in ("vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "num_key_value_heads", "rms_norm_eps"):
        assert config[key] == source[key], key
    assert (out / "generation_config.json").is_file()
    assert (out / "tokenizer.json").is_file()  # copied from the import source by default

    exported_model, original_model = load_hf(out), load_hf(hf_models[name])
    assert exported_model.config.rope_parameters == original_model.config.rope_parameters
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(exported_model.generate(prompt, **kwargs), original_model.generate(prompt, **kwargs))


def test_export_dtype_tokenizer_and_verify(hf_models, imported, tmp_path):
    from transformers import AutoTokenizer

    from megatron_exact.convert.exporter import export_hf

    source = hf_models["llama3"]
    # --verify compares the bf16 export against the fp32 checkpoint: only bf16 rounding separates them.
    out = export_hf(imported["llama3"], tmp_path / "bf16", dtype="bf16", tokenizer_dir=source, verify=True, verify_tolerance=0.5)
    state = hf_state(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["model.embed_tokens.weight"], hf_state(source)["model.embed_tokens.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).encode("w5 w7") == [5, 7]


def test_checkpoint_contract(imported):
    from megatron_exact.convert.megatron_checkpoint import read_checkpoint_header, stored_dtype
    from megatron_exact.model.config import arch_from_hf_config
    from megatron_exact.checkpoint import read_tracker

    assert read_tracker(imported["qwen2-tied"]) == "release"
    arch, padded_vocab, common = read_checkpoint_header(imported["qwen2-tied"] / "release")
    assert padded_vocab == 384 and arch.vocab_size == 300
    assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
    assert arch == arch_from_hf_config(common["hf_config"])
    assert stored_dtype(imported["qwen2-untied"] / "release") == torch.bfloat16


@pytest.mark.parametrize("name, vocab", [("qwen2-tied", 300), ("qwen3-tied", 320)])
def test_import_pads_vocabulary_for_tensor_parallelism(name, vocab, hf_models, tmp_path):
    from megatron_exact.convert.importer import import_hf
    from megatron_exact.convert.megatron_checkpoint import read_checkpoint_header

    checkpoint = import_hf(hf_models[name], tmp_path / "tp2", tensor_model_parallel_size=2, verify=True, verify_tolerance=TOL)
    arch, padded_vocab, _ = read_checkpoint_header(checkpoint)
    assert arch.vocab_size == vocab and padded_vocab == 512  # padded to a multiple of 128 x TP=2


def test_sliding_window_is_recorded_at_import_and_exported(hf_models, tmp_path, capsys):
    """A Mistral with a 40-token window: import notes and records it (the trainer decides), --verify passes on
    documents within the window, and the export spells the same window for transformers."""
    import shutil

    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.convert.megatron_checkpoint import read_checkpoint_header
    from tools.convert_checkpoint import main

    hf_dir = tmp_path / "windowed"
    shutil.copytree(hf_models["mistral-v0.3"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 40}))
    assert main(["import-hf", "--hf-dir", str(hf_dir), "--save", str(tmp_path / "ckpt"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "puts a 40-token sliding window in effect (sliding_window); recorded in the checkpoint" in out
    arch, _, _ = read_checkpoint_header(tmp_path / "ckpt" / "release")
    assert arch.sliding_window == 40
    exported = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert load_hf(exported).config.sliding_window == 40
