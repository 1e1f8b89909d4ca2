"""The FLOP and MFU count the trainer logs (training/logging.py), against a count by hand.

Definition (``FLOPS_FORMULA``): per step ``6 N T + 6 d V T + 6 L d_attn sum_docs l^2`` with ``N``
the parameters outside the embedding and output layer, ``T`` the token positions, ``V`` the padded
vocabulary, and causal attention inside each document of length ``l`` (QK^T and AV, half of the
``l x l`` products each, 2 FLOPs per multiply-add, forward + backward = 3 x forward).
"""

from __future__ import annotations

import pytest
import torch

from megatron_exact.model.config import ModelArch
from megatron_exact.model.families import QWEN2, QWEN3
from megatron_exact.model.packing import document_lengths
from megatron_exact.training.logging import model_flops, non_embedding_parameters, sum_squared_document_lengths, throughput

# d = 8, 2 query heads of 4 channels, 1 key/value group, SwiGLU of 12, 2 layers, QKV bias, 16 tokens.
ARCH = ModelArch(family=QWEN2.model_type, num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=2,
                 num_query_groups=1, vocab_size=16, max_position_embeddings=64, rotary_base=10000.0,
                 norm_epsilon=1e-6, tie_word_embeddings=True)


def hand_count_parameters() -> int:
    q, k, v, o = 8 * (2 * 4), 8 * (1 * 4), 8 * (1 * 4), (2 * 4) * 8
    qkv_bias = 2 * 4 + 1 * 4 + 1 * 4
    gate, up, down = 8 * 12, 8 * 12, 12 * 8
    norms = 8 + 8  # before attention, before the MLP
    per_layer = q + k + v + o + qkv_bias + gate + up + down + norms  # 64+32+32+64+16+288+16 = 512
    return 2 * per_layer + 8  # + the final norm


def test_non_embedding_parameters_by_hand_and_in_megatrons_model(single_process_group):
    assert hand_count_parameters() == 1032
    assert non_embedding_parameters(ARCH) == 1032
    from megatron_exact.model.builder import build_gpt_model, transformer_config

    model = build_gpt_model(ARCH, transformer_config(ARCH), seq_length=16, make_vocab_size_divisible_by=16)
    embedding = model.embedding.word_embeddings.weight.numel()
    assert sum(p.numel() for p in model.parameters()) - embedding == 1032



def test_qk_norm_parameters_are_counted(single_process_group):
    """QK-norm adds one head-sized weight for q and one for k per layer; no QKV bias (1032 - 2 * 16)."""
    from megatron_exact.model.builder import build_gpt_model, transformer_config

    arch = ARCH.replace(family=QWEN3.model_type)
    assert non_embedding_parameters(arch) == 1032 - 2 * 16 + 2 * (4 + 4)
    model = build_gpt_model(arch, transformer_config(arch), seq_length=16, make_vocab_size_divisible_by=16)
    embedding = model.embedding.word_embeddings.weight.numel()
    assert sum(p.numel() for p in model.parameters()) - embedding == non_embedding_parameters(arch)


def test_step_flops_and_mfu_by_hand():
    # Two samples of 16 tokens: documents of 5 and 11 tokens, then one of 16.
    cu_seqlens = torch.tensor([[0, 5] + [16] * 15, [0] + [16] * 16])
    lengths = document_lengths(cu_seqlens)
    assert lengths == [5, 11, 16]
    tokens, squared = 32, 5 * 5 + 11 * 11 + 16 * 16  # 402
    dense = 6 * 1032 * tokens  # 198144
    output_layer = 2 * 3 * (8 * 16) * tokens  # 24576: logits over the 16-token vocabulary
    # Per document and layer (2): QK^T and AV over the l*l/2 causal pairs, 2 heads x 4 channels each.
    attention = 3 * 2 * 2 * (2 * 4) * (squared / 2) * 2  # 38592
    expected = dense + output_layer + attention
    assert expected == 261312
    assert model_flops(ARCH, 16, tokens, sum(n * n for n in lengths)) == expected
    assert sum_squared_document_lengths(cu_seqlens) == squared  # what the trainer gives model_flops

    # 261312 FLOPs in 2 ms on 4 GPUs of 1e-4 peak TFLOP/s: 32.664e-6 TFLOP/s each, MFU 32.664%.
    tflops, mfu = throughput(expected, 0.002, 4, peak=1e-4)
    assert tflops == pytest.approx(261312 / 0.002 / 4 / 1e12, rel=1e-12)
    assert tflops == pytest.approx(32.664e-6, rel=1e-12) and mfu == pytest.approx(0.32664, rel=1e-12)
    assert throughput(expected, 0.002, 4, peak=None)[1] is None
