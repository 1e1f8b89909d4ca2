"""How a model splits over tensor- and pipeline-parallel ranks: the one divisibility rule.

Megatron-Core splits attention heads, key/value groups and the FFN width evenly over the
tensor-parallel ranks (its column-/row-parallel layers assert it) and the layers evenly
over the pipeline stages. The trainer's argument checks and the converter both ask here.
"""

from __future__ import annotations

from megatron_exact.errors import UserError
from megatron_exact.model.config import ModelArch


class ParallelLayoutError(UserError, ValueError):
    """The model cannot be split into the requested tensor-/pipeline-parallel layout."""


def check_parallel_layout(arch: ModelArch, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
    """Refuse a TP/PP layout the model cannot be split into, naming the flag, the size and the field."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
                                  "must be >= 1")
    for what, size in (
        ("attention heads (--num-attention-heads, HF num_attention_heads)", arch.num_attention_heads),
        ("key/value groups (--num-query-groups, HF num_key_value_heads)", arch.num_query_groups),
        ("FFN width (--ffn-hidden-size, HF intermediate_size)", arch.ffn_hidden_size),
    ):
        if size % tp:
            raise ParallelLayoutError(f"--tensor-model-parallel-size {tp} does not divide the model's {size} {what}")
    if arch.num_layers % pp:
        raise ParallelLayoutError(f"--pipeline-model-parallel-size {pp} does not divide the model's {arch.num_layers} "
                                  "layers (--num-layers, HF num_hidden_layers)")
