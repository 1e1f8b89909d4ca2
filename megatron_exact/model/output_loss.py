"""The output layer and its per-token cross-entropy without full-vocabulary logits.

Megatron-Core's plain path (``GPTModel`` with labels) multiplies the final
hidden states by the output weight into ``[tokens, vocab/TP]`` logits, then
``vocab_parallel_cross_entropy`` makes an fp32 copy and keeps it for the
backward pass. For Qwen2.5's 151,936-entry vocabulary one 16K-token
micro-batch is ~10 GB of fp32 logits: on a small model the output layer is
where the memory goes. This module computes the same per-token losses chunk by
chunk of tokens:

* ``chunked`` (:class:`ChunkedVocabParallelCrossEntropy`, any device, any TP):
  per chunk, the logits of this rank's vocabulary shard, their row max
  all-reduced (MAX) over TP, then the sum of ``exp(logit - max)`` and the
  target's logit (on the rank owning it, zero elsewhere) all-reduced (SUM) in
  one collective. Only the hidden states, the weight and one fp32 log-sum-exp
  per token are kept; the backward pass recomputes each chunk's logits
  (one extra ``2*T*d*V/TP`` FLOPs) and folds the per-token upstream gradient in
  before the projections sum over tokens, so EXACT's per-token weights, which
  are applied to the returned losses afterwards, get exactly their gradient.
* ``liger`` (CUDA, TP=1, ``liger-kernel`` installed): liger-kernel's fused
  linear cross-entropy with ``reduction="none"``, which defers its gradients
  to the backward pass for the same reason.

Both return what the plain path returns, the per-token losses ``[b, s]``
(fp32), so :class:`megatron_exact.loss.ExactLoss` is unchanged. Tensor and
sequence parallelism are handled around the function by Megatron-Core's own
mappings: the input is copied to the TP region (backward: all-reduce), or
all-gathered from the sequence-parallel region (backward: reduce-scatter),
exactly what the output layer's ``ColumnParallelLinear`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

# Tokens per chunk: the chunk's fp32 logits are chunk x vocab/TP x 4 bytes
# (1024 x 151,936: 0.6 GB), small against a 16K micro-batch's 10 GB.
DEFAULT_CHUNK_TOKENS = 1024
FUSED_IMPLS = ("chunked", "liger")


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token ``CE(hidden @ weight.T, labels)`` over a vocabulary split across ``group``.

    ``hidden`` ``[T, h]`` is the whole (TP-replicated) input, ``weight``
    ``[V_local, h]`` this rank's rows ``[vocab_start, vocab_start + V_local)``.
    Returns fp32 losses ``[T]`` (float64 for float64 input). The gradient of
    ``hidden`` is this rank's partial sum (the caller's TP mapping reduces it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start: int, chunk_tokens: int, group):
        tokens, vocab_local = hidden.shape[0], weight.shape[0]
        reduce = group is not None and torch.distributed.get_world_size(group) > 1
        accumulate = _accumulation_dtype(hidden)
        losses = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        log_sum_exp = torch.empty_like(losses)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            # Logits in the input's dtype, as the output layer makes them, then fp32 as in
            # Megatron-Core's vocab_parallel_cross_entropy.
            logits = torch.matmul(hidden[start:end], weight.t()).to(accumulate)
            row_max = logits.max(dim=-1).values
            if reduce:
                torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
            local_target, owned = _local_targets(labels[start:end], vocab_start, vocab_local)
            target_logit = logits.gather(1, local_target.unsqueeze(1)).squeeze(1) * owned.to(accumulate)
            sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=-1)
            if reduce:
                both = torch.stack([sum_exp, target_logit])
                torch.distributed.all_reduce(both, group=group)
                sum_exp, target_logit = both[0], both[1]
            chunk_lse = sum_exp.log_() + row_max
            log_sum_exp[start:end] = chunk_lse
            losses[start:end] = chunk_lse - target_logit
        ctx.save_for_backward(hidden, weight, labels, log_sum_exp)
        ctx.vocab_start, ctx.chunk_tokens = vocab_start, chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, log_sum_exp = ctx.saved_tensors
        tokens, vocab_local = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        accumulate = _accumulation_dtype(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_losses = grad_losses.to(accumulate)
        for start in range(0, tokens, ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, tokens)
            chunk = hidden[start:end]
            # d CE / d logits = softmax - onehot(target), times each token's upstream gradient.
            grad_logits = torch.matmul(chunk, weight.t()).to(accumulate)
            grad_logits.sub_(log_sum_exp[start:end].unsqueeze(1)).exp_()
            local_target, owned = _local_targets(labels[start:end], ctx.vocab_start, vocab_local)
            grad_logits.scatter_add_(1, local_target.unsqueeze(1), -owned.to(accumulate).unsqueeze(1))
            grad_logits.mul_(grad_losses[start:end].unsqueeze(1))
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.matmul(grad_logits, weight)
            if grad_weight is not None:
                grad_weight += torch.matmul(grad_logits.t(), chunk).to(accumulate)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (Megatron-Core's CE is fp32); float64 stays float64 (gradcheck)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _local_targets(labels: torch.Tensor, vocab_start: int, vocab_local: int):
    """Labels as indices into this rank's vocabulary shard (clamped), and a bool mask of those this rank owns."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), owned


@dataclasses.dataclass(frozen=True)
class FusedOutputLoss:
    """The fused output layer + per-token cross-entropy of one model (see the module docstring)."""

    impl: str = "chunked"  # one of FUSED_IMPLS
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        if self.impl not in FUSED_IMPLS:
            raise ValueError(f"fused output loss implementation must be one of {FUSED_IMPLS}, got {self.impl!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")

    def __call__(self, hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 sequence_parallel: bool, group=None) -> torch.Tensor:
        """Per-token losses ``[b, s]`` (fp32) of final hidden states ``[s(/TP), b, h]``."""
        if group is None:
            group = parallel_state.get_tensor_model_parallel_group()
        tp_size = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        if sequence_parallel and tp_size > 1:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=group)
        elif tp_size > 1:
            hidden_states = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=group)
        seq, batch, width = hidden_states.shape
        # [s, b, h] -> [b*s, h]: the token order of labels [b, s] (a view for our one packed row).
        flat = hidden_states.transpose(0, 1).reshape(batch * seq, width)
        flat_labels = labels.reshape(-1)
        if flat_labels.numel() != flat.shape[0]:
            raise ValueError(f"labels hold {flat_labels.numel()} tokens but the hidden states {flat.shape[0]}")
        if self.impl == "liger":
            if tp_size > 1:
                raise ValueError("liger's fused linear cross-entropy has no vocabulary parallelism: use TP=1 "
                                 "or the chunked implementation")
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            losses = liger_fused_linear_cross_entropy(flat, weight, flat_labels, reduction="none").float()
        else:
            rank = torch.distributed.get_rank(group) if tp_size > 1 else 0
            losses = ChunkedVocabParallelCrossEntropy.apply(
                flat, weight, flat_labels, rank * weight.shape[0], self.chunk_tokens, group if tp_size > 1 else None)
        return losses.view(batch, seq)


class GPTModelWithOutputLoss(GPTModel):
    """Megatron-Core's ``GPTModel`` whose loss, when ``output_loss`` is set, skips the logits.

    Only the training/validation loss changes (labels given, no inference
    context, no multi-token prediction): everything else, the output layer's
    parameters and checkpoints included, is ``GPTModel``'s own.
    """

    def __init__(self, *args, output_loss: Optional[FusedOutputLoss] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_loss = output_loss

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (self.output_loss is None or labels is None or not self.post_process
                or kwargs.get("inference_context") is not None or kwargs.get("mtp_in_postprocess")
                or self.config.mtp_num_layers is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return self.output_loss(hidden_states, weight, labels, sequence_parallel=self.output_layer.sequence_parallel)
