"""Model presets against the published configs, and the HF-config builder against the presets.

Reference values are transcribed from independent public sources (not imported):

* LITGPT: https://github.com/Lightning-AI/litgpt/blob/26857050fe3ff627cd714fe92f5838f51a3d5efa/litgpt/config.py
  (each entry quotes the model's huggingface.co config.json; litgpt's ``padded_vocab_size`` is
  the HF ``vocab_size``, its ``block_size`` the HF ``max_position_embeddings``,
  ``n_embd`` defaults to 4096 and ``norm_eps`` to 1e-5; ``rope_adjustments`` is HF's
  llama3 ``rope_scaling``, ``original_max_seq_len`` its ``original_max_position_embeddings``).
* BRIDGE_QWEN: https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/fb8a4d6bffdc62ddcd78fc520a4304353d52aca1/src/megatron/bridge/models/qwen/qwen_provider.py
* BRIDGE_QWEN3: https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/53f91f2283278a73b9d135b37f3f1af8727f2db3/src/megatron/bridge/models/qwen/qwen_provider.py
  (Qwen3ModelProvider600M/1P7B/4B/8B: ``kv_channels`` 128, ``qk_layernorm``)
* BRIDGE_MISTRAL: https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/067f987df03b8355b03192d88d70f1709fedf51a/src/megatron/bridge/models/mistral/mistral_provider.py
  (MistralModelProvider: the 7B v0.3 sizes, no sliding window, untied)
* BRIDGE_LLAMA: https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/2afd2d34f7d7b2e84095af1a7fd7244902189ebc/src/megatron/bridge/models/llama/llama_provider.py
  (tie flags: ``share_embeddings_and_output_weights`` of Qwen25ModelProvider500M/1P5B/3B/7B,
  Llama32ModelProvider1B/3B, Llama31ModelProvider8B, Qwen3ModelProvider*, MistralModelProvider; litgpt does not record them).
"""

import dataclasses
import json
import re

import pytest

from megatron_exact.model.config import PRESETS, RopeScaling, UnsupportedModelError, arch_from_hf_config, get_preset
from megatron_exact.model.families import LLAMA, MISTRAL, QWEN2, QWEN3

LITGPT = "https://github.com/Lightning-AI/litgpt/blob/26857050fe3ff627cd714fe92f5838f51a3d5efa/litgpt/config.py"
BRIDGE_QWEN = (
    "https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/fb8a4d6bffdc62ddcd78fc520a4304353d52aca1"
    "/src/megatron/bridge/models/qwen/qwen_provider.py"
)
BRIDGE_QWEN3 = (
    "https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/53f91f2283278a73b9d135b37f3f1af8727f2db3"
    "/src/megatron/bridge/models/qwen/qwen_provider.py"
)
BRIDGE_MISTRAL = (
    "https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/067f987df03b8355b03192d88d70f1709fedf51a"
    "/src/megatron/bridge/models/mistral/mistral_provider.py"
)
BRIDGE_LLAMA = (
    "https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/2afd2d34f7d7b2e84095af1a7fd7244902189ebc"
    "/src/megatron/bridge/models/llama/llama_provider.py"
)

LLAMA32_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# preset: (family, hidden, layers, heads, kv_heads, intermediate, vocab, max_positions, rope_theta, rope_scaling,
#          rms_norm_eps, tie_word_embeddings, source of the values, source of the tie flag)
REFERENCE = {
    "qwen2.5-0.5b": (QWEN2, 896, 24, 14, 2, 4864, 151936, 32768, 1000000.0, None, 1e-6, True,
                     LITGPT + " (Qwen2.5-0.5B{})", BRIDGE_QWEN + " (Qwen25ModelProvider500M)"),
    "qwen2.5-1.5b": (QWEN2, 1536, 28, 12, 2, 8960, 151936, 131072, 1000000.0, None, 1e-6, True,
                     LITGPT + " (Qwen2.5-1.5B{})", BRIDGE_QWEN + " (Qwen25ModelProvider1P5B)"),
    "qwen2.5-3b": (QWEN2, 2048, 36, 16, 2, 11008, 151936, 32768, 1000000.0, None, 1e-6, True,
                   LITGPT + " (Qwen2.5-3B{})", BRIDGE_QWEN + " (Qwen25ModelProvider3B)"),
    "qwen2.5-7b": (QWEN2, 3584, 28, 28, 4, 18944, 152064, 131072, 1000000.0, None, 1e-6, False,
                   LITGPT + " (Qwen2.5-7B{})", BRIDGE_QWEN + " (Qwen25ModelProvider7B: Qwen2ModelProvider default)"),
    "llama3.2-1b": (LLAMA, 2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, LLAMA32_ROPE, 1e-5, True,
                    LITGPT + " (Llama-3.2-1B{})", BRIDGE_LLAMA + " (Llama32ModelProvider1B)"),
    "llama3.2-3b": (LLAMA, 3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, LLAMA32_ROPE, 1e-5, True,
                    LITGPT + " (Llama-3.2-3B{})", BRIDGE_LLAMA + " (Llama32ModelProvider3B)"),
    "llama3.1-8b": (LLAMA, 4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, LLAMA31_ROPE, 1e-5, False,
                    LITGPT + " (Llama-3.1-8B{}, n_embd default 4096)", BRIDGE_LLAMA + " (Llama31ModelProvider8B)"),
    "qwen3-0.6b": (QWEN3, 1024, 28, 16, 8, 3072, 151936, 40960, 1000000.0, None, 1e-6, True,
                   LITGPT + " (Qwen3-0.6B{})", BRIDGE_QWEN3 + " (Qwen3ModelProvider600M)"),
    "qwen3-1.7b": (QWEN3, 2048, 28, 16, 8, 6144, 151936, 40960, 1000000.0, None, 1e-6, True,
                   LITGPT + " (Qwen3-1.7B{})", BRIDGE_QWEN3 + " (Qwen3ModelProvider1P7B)"),
    "qwen3-4b": (QWEN3, 2560, 36, 32, 8, 9728, 151936, 40960, 1000000.0, None, 1e-6, True,
                 LITGPT + " (Qwen3-4B{})", BRIDGE_QWEN3 + " (Qwen3ModelProvider4B)"),
    "qwen3-8b": (QWEN3, 4096, 36, 32, 8, 12288, 151936, 40960, 1000000.0, None, 1e-6, False,
                 LITGPT + " (Qwen3-8B{})", BRIDGE_QWEN3 + " (Qwen3ModelProvider8B: Qwen3ModelProvider default)"),
    "mistral-7b-v0.3": (MISTRAL, 4096, 32, 32, 8, 14336, 32768, 32768, 1000000.0, None, 1e-5, False,
                        LITGPT + " (Mistral-7B-v0.3, n_embd default 4096, n_head default 32)",
                        BRIDGE_MISTRAL + " (MistralModelProvider)"),
}
# Explicit head sizes (litgpt's head_size, which defaults to n_embd // n_head; Bridge's kv_channels = 128 for Qwen3).
HEAD_DIM = {"qwen3-0.6b": 128, "qwen3-1.7b": 128, "qwen3-4b": 128, "qwen3-8b": 128}


def hf_config_json(name):
    """The model's config.json as its publisher writes it, filled from the reference row."""
    family, hidden, layers, heads, kv_heads, ffn, vocab, max_pos, theta, rope, eps, tie = REFERENCE[name][:12]
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    # The fields each publisher's config.json has beyond those (as on huggingface.co).
    if family is QWEN2:
        config.update(use_sliding_window=False, sliding_window=max_pos, max_window_layers=layers, rope_scaling=None)
    elif family is LLAMA:
        config.update(attention_bias=False, mlp_bias=False, head_dim=hidden // heads,
                      rope_scaling={"rope_type": "llama3", **rope})
    elif family is QWEN3:
        config.update(attention_bias=False, head_dim=HEAD_DIM[name], use_sliding_window=False, sliding_window=None,
                      max_window_layers=layers, rope_scaling=None)
    elif family is MISTRAL:
        config.update(sliding_window=None, bos_token_id=1, eos_token_id=2)
    return config


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_matches_published_config(name):
    family, hidden, layers, heads, kv_heads, ffn, vocab, max_pos, theta, rope, eps, tie = REFERENCE[name][:12]
    arch = PRESETS[name]
    assert arch.hidden_size == hidden
    assert arch.num_layers == layers
    assert arch.num_attention_heads == heads
    assert arch.num_query_groups == kv_heads
    assert arch.ffn_hidden_size == ffn
    assert arch.vocab_size == vocab
    assert arch.max_position_embeddings == max_pos
    assert arch.rotary_base == theta
    assert arch.rope_scaling == (RopeScaling(**rope) if rope else None)
    assert arch.norm_epsilon == eps
    assert arch.tie_word_embeddings is tie
    assert arch.kv_channels == HEAD_DIM.get(name, hidden // heads)
    assert arch.add_qkv_bias is (family is QWEN2)
    assert arch.qk_layernorm is (family is QWEN3)
    assert arch.model_family is family


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_hf_config_builder_gives_the_preset(name, tmp_path):
    config = hf_config_json(name)
    assert arch_from_hf_config(config) == PRESETS[name]
    # The file and its directory too, as users pass them.
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert arch_from_hf_config(tmp_path) == PRESETS[name]
    assert arch_from_hf_config(tmp_path / "config.json") == PRESETS[name]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_transformers_own_config_serialisation_gives_the_preset(name):
    """transformers 5 writes RoPE under ``rope_parameters``; what it saves must read back the same."""
    from transformers import AutoConfig

    config = hf_config_json(name)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    assert arch_from_hf_config(AutoConfig.for_model(config["model_type"], **fields).to_dict()) == PRESETS[name]


def test_tiny_presets_are_valid_small_members_of_their_family():
    for name, family in (("tiny-qwen2", QWEN2), ("tiny-llama3", LLAMA), ("tiny-qwen3", QWEN3)):
        arch = get_preset(name)
        assert arch.model_family is family
        assert arch.num_attention_heads % arch.num_query_groups == 0
        assert arch.hidden_size % arch.num_attention_heads == 0


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"--model 'qwen9'.*qwen2\.5-0\.5b"):
        get_preset("qwen9")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
        ({"model_type": QWEN2.moe_model_types[0], "num_experts": 60},
         f"model_type '{QWEN2.moe_model_types[0]}' is the mixture-of-experts variant"),
        ({"num_experts": 8}, "num_experts"),
        ({"num_local_experts": 8}, "num_local_experts"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, "rope_parameters"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_builder_refuses_what_the_model_would_compute_differently(change, field):
    config = {**hf_config_json("qwen2.5-0.5b"), **change}
    with pytest.raises(UnsupportedModelError, match=field):
        arch_from_hf_config(config)


@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
def test_linear_rope_scaling_is_position_interpolation(field):
    """HF's "linear" RoPE divides positions by its factor: Megatron's seq_len_interpolation_factor."""
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    arch = arch_from_hf_config({**hf_config_json("qwen2.5-0.5b"), field: scaling})
    assert arch.rotary_seq_len_interpolation_factor == 2.0 and arch.rope_scaling is None
    assert arch_from_hf_config(hf_config_json("qwen2.5-0.5b")).rotary_seq_len_interpolation_factor is None


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_llama_biases_are_refused(field):
    with pytest.raises(UnsupportedModelError, match=f"{field}=True is not supported for LLaMA-3.x"):
        arch_from_hf_config({**hf_config_json("llama3.2-1b"), field: True})


def test_refusal_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf_config_json("llama3.1-8b"), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UnsupportedModelError, match=str(path)):
        arch_from_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        arch_from_hf_config(tmp_path / "missing")


def test_non_default_llama3_rope_values_are_kept():
    rope = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 4096}
    arch = arch_from_hf_config({**hf_config_json("llama3.1-8b"), "rope_scaling": rope})
    assert arch.rope_scaling == RopeScaling(16.0, 2.0, 8.0, 4096)
    assert dataclasses.replace(arch, rope_scaling=PRESETS["llama3.1-8b"].rope_scaling) == PRESETS["llama3.1-8b"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": QWEN3.moe_model_types[0], "num_experts": 128, "moe_intermediate_size": 768},
         f"model_type '{QWEN3.moe_model_types[0]}' is the mixture-of-experts variant of Qwen3: only dense models"),
        ({"num_experts": 128}, "mixture-of-experts models (num_experts=128) are not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported for Qwen3 (only False)"),
        ({"head_dim": None}, "Qwen3 config lacks 'head_dim'"),
    ],
)
def test_qwen3_refusals(change, message):
    config = {**hf_config_json("qwen3-0.6b"), **change}
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        arch_from_hf_config(config)
