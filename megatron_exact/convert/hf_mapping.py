"""Parameter names and layouts between HF checkpoints and Megatron-Core's GPTModel (every family).

One :class:`ParamMapping` per Megatron parameter (names of the local-spec
model at TP=1/PP=1, i.e. the full, unsharded tensors) says which HF tensors it
is made of and how. The names in the ``torch_dist`` checkpoint are the ones
Megatron-Core's ``sharded_state_dict`` gives these parameters, which are
Transformer Engine's (e.g. ``decoder.layers.self_attention.linear_qkv.layer_norm_weight``
for the input norm), the same keys Megatron-Bridge's Qwen2/LLaMA bridges
produce, so checkpoints move between the two.

Layouts:
- QKV: Megatron fuses ``q_proj``/``k_proj``/``v_proj`` per query group: for
  each KV group ``g`` the rows are ``[q heads of g, k_g, v_g]`` (weight and,
  for families with QKV bias, bias).
- QK-norm (Qwen3): ``self_attn.q_norm``/``k_norm`` (one RMSNorm weight of
  ``head_dim`` shared by all heads) are Megatron-Core's
  ``self_attention.q_layernorm``/``k_layernorm``, as in Megatron-Bridge's Qwen3 map.
- SwiGLU: ``linear_fc1`` is ``cat([gate_proj, up_proj])`` along rows.
- Vocabulary: Megatron pads the embedding (and untied output layer) rows to
  ``padded_vocab_size``; padded rows are zero on import and dropped on export.

Every conversion is a pure function of tensors, so it also runs on ``meta``
tensors: the exporter uses that to learn the HF shapes before writing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from megatron_exact.model.config import ModelArch, UnsupportedModelError

# How a Megatron tensor is made from its HF tensors.
COPY = "copy"  # one HF tensor, same layout
VOCAB = "vocab"  # one HF tensor, rows padded to the padded vocabulary
QKV = "qkv"  # q, k, v interleaved per query group
GATE_UP = "gate_up"  # gate and up stacked along rows


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    megatron: str  # parameter name in the TP=1, PP=1 local-spec GPTModel
    hf: tuple[str, ...]  # HF tensor names it is made of, in order
    kind: str


def param_mappings(arch: ModelArch) -> list[ParamMapping]:
    """All parameters of ``arch``, in HF checkpoint order (embeddings, layers, norm, head)."""
    maps = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        maps.append(ParamMapping(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",), COPY))
        maps.append(
            ParamMapping(
                mc + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                QKV,
            )
        )
        if arch.add_qkv_bias:
            maps.append(
                ParamMapping(
                    mc + "self_attention.linear_qkv.bias",
                    (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                    QKV,
                )
            )
        if arch.qk_layernorm:
            maps.append(ParamMapping(mc + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), COPY))
            maps.append(ParamMapping(mc + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), COPY))
        maps.append(ParamMapping(mc + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COPY))
        maps.append(ParamMapping(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), COPY))
        maps.append(
            ParamMapping(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GATE_UP)
        )
        maps.append(ParamMapping(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), COPY))
    maps.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), COPY))
    if not arch.tie_word_embeddings:
        maps.append(ParamMapping("output_layer.weight", ("lm_head.weight",), VOCAB))
    return maps


def _group_view(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """``[groups * n, ...] -> [groups, n, ...]`` (works for weights and biases)."""
    return tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:])


def hf_to_megatron(mapping: ParamMapping, hf_tensors: Sequence[torch.Tensor], arch: ModelArch, padded_vocab_size: int) -> torch.Tensor:
    """The Megatron tensor of ``mapping`` from its HF tensors (in ``mapping.hf`` order)."""
    if mapping.kind == COPY:
        return hf_tensors[0]
    if mapping.kind == VOCAB:
        (table,) = hf_tensors
        if table.shape[0] != arch.vocab_size:
            raise ValueError(f"{mapping.hf[0]} has {table.shape[0]} rows but config.json says vocab_size={arch.vocab_size}")
        padding = table.new_zeros(padded_vocab_size - table.shape[0], *table.shape[1:])
        return torch.cat([table, padding])
    if mapping.kind == GATE_UP:
        return torch.cat(list(hf_tensors))
    if mapping.kind == QKV:
        q, k, v = hf_tensors
        groups = arch.num_query_groups
        fused = torch.cat([_group_view(q, groups), _group_view(k, groups), _group_view(v, groups)], dim=1)
        return fused.reshape(-1, *q.shape[1:])
    raise ValueError(f"unknown mapping kind {mapping.kind!r}")


def megatron_to_hf(mapping: ParamMapping, tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """The HF tensors of ``mapping`` (in ``mapping.hf`` order) from the full Megatron tensor.

    Returns views where the layout allows (copies, vocabulary trim, gate/up),
    so that exporting does not duplicate the model in memory.
    """
    if mapping.kind == COPY:
        return [tensor]
    if mapping.kind == VOCAB:
        return [tensor[: arch.vocab_size]]
    if mapping.kind == GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]
    if mapping.kind == QKV:
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        q_rows = arch.num_attention_heads // groups * head_dim
        per_group = _group_view(tensor, groups)
        q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
        return [part.reshape(-1, *tensor.shape[1:]) for part in (q, k, v)]
    raise ValueError(f"unknown mapping kind {mapping.kind!r}")


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of ``arch`` (for checking an input checkpoint before converting)."""
    hidden, head_dim = arch.hidden_size, arch.kv_channels
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, hidden), "model.norm.weight": (hidden,)}
    q_out, kv_out = arch.num_attention_heads * head_dim, arch.num_query_groups * head_dim
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (q_out, hidden),
                p + "self_attn.k_proj.weight": (kv_out, hidden),
                p + "self_attn.v_proj.weight": (kv_out, hidden),
                p + "self_attn.o_proj.weight": (hidden, q_out),
                p + "mlp.gate_proj.weight": (arch.ffn_hidden_size, hidden),
                p + "mlp.up_proj.weight": (arch.ffn_hidden_size, hidden),
                p + "mlp.down_proj.weight": (hidden, arch.ffn_hidden_size),
            }
        )
        if arch.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
        if arch.add_qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q_out,),
                    p + "self_attn.k_proj.bias": (kv_out,),
                    p + "self_attn.v_proj.bias": (kv_out,),
                }
            )
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    return shapes


def hf_rope_parameters(arch: ModelArch) -> dict:
    """HF's ``rope_parameters`` for what ``arch``'s RoPE computes: theta, plus llama3 frequency
    scaling or linear position interpolation (``{"rope_type": "linear", "factor": f}``).

    Raises :class:`UnsupportedModelError` for a combination HF cannot express (it has one
    ``rope_type``): llama3 scaling together with linear interpolation.
    """
    scaling, factor = arch.rope_scaling, arch.rotary_seq_len_interpolation_factor
    if scaling is not None and factor is not None:
        raise UnsupportedModelError(
            f"the model combines llama3 RoPE scaling (factor {scaling.factor}) with linear position interpolation "
            f"(factor {factor}): a HF config has one rope_type and cannot express both, so transformers would "
            "compute another model; train with one of --use-rope-scaling/--rope-scaling-factor and "
            "--rotary-seq-len-interpolation-factor"
        )
    if scaling is not None:
        return {
            "rope_type": "llama3",
            "rope_theta": arch.rotary_base,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    if factor is not None:
        return {"rope_type": "linear", "rope_theta": arch.rotary_base, "factor": factor}
    return {"rope_type": "default", "rope_theta": arch.rotary_base}


def hf_config_dict(arch: ModelArch, dtype: torch.dtype, base: dict | None = None) -> dict:
    """A HF ``config.json`` for ``arch``.

    ``base`` is the config the checkpoint was imported from, if known: its
    other fields (token ids, ``initializer_range`` ...) are kept, while every
    field the architecture determines is overwritten from ``arch`` so that a
    model whose architecture changed (e.g. RoPE) exports what it really is.
    """
    config = dict(base or {})
    for stale in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype", "transformers_version"):
        config.pop(stale, None)
    rope_parameters = hf_rope_parameters(arch)
    config.update(
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        # Both spellings: transformers 5 reads rope_parameters, vLLM and transformers 4 read rope_theta/rope_scaling.
        rope_theta=arch.rotary_base,
        rope_parameters=rope_parameters,
        dtype=_DTYPE_NAMES[dtype],
        torch_dtype=_DTYPE_NAMES[dtype],
    )
    if rope_parameters["rope_type"] != "default":
        config["rope_scaling"] = dict(rope_parameters)
    arch.model_family.write_config(config, arch.sliding_window, arch.num_layers)
    return config


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
