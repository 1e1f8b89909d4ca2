"""Tiny random HF models (built locally with transformers, seeded) for the conversion tests.

Imported as ``tests.convert.tiny_hf_models`` (a module name no other test directory shares).

HF initialises biases to zero and RMSNorm weights to one, which would hide a
swapped norm or a misplaced bias: every parameter is redrawn at random here.
"""

import torch

from megatron_exact.model.families import LLAMA, MISTRAL, QWEN2, QWEN3

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
)
# name -> (family description, config overrides, save dtype, max_shard_size)
MODELS = {
    # GQA, QKV bias, tied embeddings, vocabulary needing padding (300 -> 384), sharded safetensors.
    "qwen2-tied": (QWEN2, dict(vocab_size=300, tie_word_embeddings=True), torch.float32, "100KB"),
    # Untied output layer, stored in bf16 (the checkpoint stays bf16, the export too).
    "qwen2-untied": (QWEN2, dict(vocab_size=200, tie_word_embeddings=False), torch.bfloat16, None),
    # llama3 RoPE scaling with a short original length, so scaling changes most frequencies.
    "llama3": (
        LLAMA,
        dict(
            vocab_size=256, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16},
        ),
        torch.float32,
        None,
    ),
    # QK-norm; tied, with a head_dim (32) other than hidden_size / heads (16); vocabulary padded 320 -> 384.
    "qwen3-tied": (QWEN3, dict(vocab_size=320, tie_word_embeddings=True, head_dim=32), torch.float32, None),
    # QK-norm, untied output layer, head_dim = hidden_size / heads.
    "qwen3-untied": (QWEN3, dict(vocab_size=256, tie_word_embeddings=False, head_dim=16, rope_theta=1000000.0),
                     torch.float32, None),
    # v0.3-style: full attention (transformers' Mistral default is a 4096-token window), untied, GQA.
    "mistral-v0.3": (MISTRAL, dict(vocab_size=288, tie_word_embeddings=False, sliding_window=None,
                                     rope_theta=1000000.0), torch.float32, None),
}


def hf_config(name, **changes):
    """transformers' own config class for the family of ``name`` (found by its ``model_type``)."""
    from transformers import AutoConfig

    family, overrides, _, _ = MODELS[name]
    return AutoConfig.for_model(family.model_type, **{**COMMON, **overrides, **changes})


def build_hf_model(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def save_tokenizer(directory):
    """A small word-level tokenizer over the tiny vocabulary (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 200)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))
