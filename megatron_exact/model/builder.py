"""Turn a :class:`ModelArch` into Megatron-Core's ``TransformerConfig`` and ``GPTModel``.

Layer spec: Transformer Engine's GPT spec (it handles THD/packed attention
itself) or Megatron-Core's local spec with :class:`PackedDocumentAttention` as
core attention. The trainer decides with :mod:`megatron_exact.model.paths`
(local unless ``--transformer-impl transformer_engine``; fused kernels and the
output loss too); a caller that gives no ``paths`` gets TE's spec when TE is
importable on a GPU. The local spec maps its norm names onto TE's in
distributed checkpoints, so checkpoints move between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_exact.model.attention import PackedDocumentAttention
from megatron_exact.model.config import ModelArch, RopeScaling
from megatron_exact.model.output_loss import FusedOutputLoss, GPTModelWithOutputLoss
from megatron_exact.model.paths import ModelPaths
from megatron_exact.platform import has_transformer_engine


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Megatron-LM's vocabulary padding: a multiple of ``divisible_by * TP``."""
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be positive, got {make_vocab_size_divisible_by} "
                         "(1: no padding beyond the tensor-parallel size)")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local (non-TE) spec, usable with sequence parallelism.

    Megatron-Core's ``WrappedTorchNorm`` (the local spec's norm without apex)
    refuses sequence parallelism. All a norm needs for it is what TENorm and
    apex's FusedLayerNorm do: mark the weight ``sequence_parallel`` so that
    ``finalize_model_grads`` sums its gradient over the TP ranks, each of which
    saw a different slice of the sequence.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused_norm_options):
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm implements RMSNorm only, got normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(config: TransformerConfig, use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """The transformer-layer spec for our dense models (RMSNorm, SwiGLU, GQA, RoPE; QK-norm where
    ``config.qk_layernorm``, Megatron-Core's per-head RMSNorm of q and k before RoPE)."""
    if use_transformer_engine is None:
        use_transformer_engine = has_transformer_engine()
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = PackedDocumentAttention
    if config.qk_layernorm:
        # finalize_model_grads sums q/k-norm gradients over TP (each rank holds other heads).
        attention.q_layernorm = LocalRMSNorm
        attention.k_layernorm = LocalRMSNorm
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    return spec


def block_spec(config: TransformerConfig, use_transformer_engine: Optional[bool] = None):
    """This pipeline stage's decoder block: the layer spec, plus the local final norm without TE.

    Without TE, Megatron-Core would pick ``WrappedTorchNorm`` for the final norm
    of a bare layer spec, which cannot run with sequence parallelism.
    """
    spec = layer_spec(config, use_transformer_engine)
    if use_transformer_engine or (use_transformer_engine is None and has_transformer_engine()):
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=LocalRMSNorm)


def transformer_config(
    arch: ModelArch,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    **overrides,
) -> TransformerConfig:
    """A ``TransformerConfig`` for ``arch`` at the given parallel layout.

    Dropout is off unless ``hidden_dropout``/``attention_dropout`` are given (off is what
    these models use in CPT); the loss is per token
    (``calculate_per_token_loss``) so that EXACT's normalisation by supervised
    tokens is exact under gradient accumulation, DP and CP. Fusions that need
    CUDA kernels are off unless a GPU with TE is present.
    """
    on_gpu_with_te = has_transformer_engine()
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False,
        bias_activation_fusion=on_gpu_with_te,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _apply_llama3_rope_scaling(model: GPTModel, arch: ModelArch) -> None:
    """Megatron-Core hard-codes LLaMA-3.1's low/high-frequency factors and 8192 original length:
    recompute the inverse frequencies when a config uses other values."""
    scaling = arch.rope_scaling
    if scaling is None or scaling == RopeScaling(factor=scaling.factor):
        return
    rope = model.rotary_pos_emb
    dim = arch.kv_channels
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim
    inv_freq = 1.0 / (arch.rotary_base ** exponents)
    rope.inv_freq = rope._apply_scaling(
        inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def build_gpt_model(
    arch: ModelArch,
    config: TransformerConfig,
    *,
    seq_length: int,
    make_vocab_size_divisible_by: int = 128,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    use_transformer_engine: Optional[bool] = None,
    output_loss: Optional[FusedOutputLoss] = None,
    paths: Optional[ModelPaths] = None,
) -> GPTModel:
    """One pipeline stage of the GPT model for ``arch`` (stage taken from ``parallel_state``).

    Everything the model computes comes from ``arch``, RoPE included (base, llama3
    scaling, linear position interpolation), so that the architecture a checkpoint
    records is the model that trained. ``output_loss``: compute the loss without
    full-vocabulary logits (:mod:`megatron_exact.model.output_loss`); None:
    Megatron-Core's plain path.
    ``paths`` (:func:`megatron_exact.model.paths.select_paths`) decides the spec, its
    fused modules and the output loss instead (build ``config`` with its
    ``config_overrides()``).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if paths is not None:
        if output_loss is not None or use_transformer_engine is not None:
            raise ValueError("give either paths or output_loss/use_transformer_engine, not both")
        use_transformer_engine, output_loss = paths.use_transformer_engine, paths.output_loss()
    spec = block_spec(config, use_transformer_engine)
    if paths is not None:
        paths.customize_block_spec(spec)
    model = GPTModelWithOutputLoss(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size),
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling is not None,
        rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
        seq_len_interpolation_factor=arch.rotary_seq_len_interpolation_factor,
        output_loss=output_loss,
    )
    _apply_llama3_rope_scaling(model, arch)
    return model
