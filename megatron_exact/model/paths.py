"""Which attention, norm, activation and loss implementation a run uses, and why.

One decision, made before the model is built, from the flags and what this
machine has (:class:`Environment`), and printed as one line at start
(:meth:`ModelPaths.describe`):

* layer spec: Megatron-Core's local spec with :class:`PackedDocumentAttention`
  (default), or Transformer Engine's spec with ``--transformer-impl
  transformer_engine`` where TE is importable. The TE path (THD
  ``padding_causal`` attention, TE norms and fused activations) is Megatron-Core's
  own and untested in this project: none of our machines has TE.
* attention on the local spec: torch's flash varlen attention over the whole
  packed row (CUDA, bf16/fp16, CP=1, a torch that has it), else causal SDPA per
  document.
* RMSNorm and SwiGLU on the local spec: liger-kernel's Triton kernels on CUDA
  when liger-kernel is installed (``--no-norm-fusion``,
  ``--no-bias-swiglu-fusion`` turn them off), else torch's modules.
* output layer + loss: fused (no full-vocabulary logits,
  :mod:`megatron_exact.model.output_loss`) by default on CUDA, Megatron-Core's
  plain vocab-parallel path on CPU, where it is the reference.
  ``--cross-entropy-loss-fusion`` / ``--no-cross-entropy-loss-fusion`` force
  either; ``--cross-entropy-fusion-impl`` picks the implementation: ``liger``
  (CUDA, TP=1; the default there when installed) or ``chunked`` (ours, any
  device and TP; the default otherwise). Megatron-LM's values of that flag,
  ``native`` and ``te``, fuse only the cross-entropy over materialised logits;
  they are refused (on CPU ``native`` took a minute to compile and its
  gradients differed from the plain path's by ~1e-3 relative).

A request this machine cannot serve (TE or liger asked for and missing) is an
error naming the flag; a default that falls back says why in the log line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from typing import Optional

import torch

from megatron_exact.model.output_loss import DEFAULT_CHUNK_TOKENS, FusedOutputLoss

TRANSFORMER_IMPLS = ("local", "transformer_engine")
CROSS_ENTROPY_FUSION_IMPLS = ("chunked", "liger")


class PathError(ValueError):
    """A requested implementation this machine or layout cannot run; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """What this machine offers the model."""

    cuda: bool
    transformer_engine: bool
    liger: bool
    liger_missing: str  # why liger is not usable ("" when it is)
    varlen_attention: bool

    @classmethod
    def detect(cls) -> "Environment":
        from megatron_exact.model import attention
        from megatron_exact.platform import has_transformer_engine

        cuda = torch.cuda.is_available()
        liger, missing = False, "no CUDA (liger-kernel's kernels are Triton)"
        if cuda:
            if importlib.util.find_spec("liger_kernel") is None:
                missing = "liger-kernel is not installed"
            else:
                try:
                    import liger_kernel.megatron  # noqa: F401
                    import liger_kernel.transformers.functional  # noqa: F401

                    liger, missing = True, ""
                except ImportError as error:
                    missing = f"liger-kernel does not import ({error})"
        return cls(cuda=cuda, transformer_engine=has_transformer_engine(), liger=liger, liger_missing=missing,
                   varlen_attention=attention._VARLEN_ATTENTION is not None)


@dataclasses.dataclass(frozen=True)
class PathRequest:
    """The flags that steer the choice (see :func:`add_path_args`)."""

    transformer_impl: str = "local"
    cross_entropy_loss_fusion: Optional[bool] = None  # None: fused on CUDA
    cross_entropy_fusion_impl: Optional[str] = None  # None: liger where it can run, else chunked
    cross_entropy_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    norm_fusion: bool = True
    bias_swiglu_fusion: bool = True
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    bf16: bool = False
    attention_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """The chosen implementations; ``reasons`` says why for each (same keys as the fields it explains)."""

    transformer_impl: str
    attention: str
    norm: str  # torch | liger | transformer_engine
    swiglu: str  # torch | liger | transformer_engine
    loss: str  # plain | chunked | liger
    chunk_tokens: int
    reasons: dict

    @property
    def use_transformer_engine(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    def output_loss(self) -> Optional[FusedOutputLoss]:
        """The fused output loss to build the model with (None: Megatron-Core computes the loss)."""
        if self.loss == "plain":
            return None
        return FusedOutputLoss(impl=self.loss, chunk_tokens=self.chunk_tokens)

    def config_overrides(self) -> dict:
        """``TransformerConfig`` fields these paths need."""
        return dict(bias_activation_fusion=self.use_transformer_engine, use_te_activation_func=self.swiglu == "liger")

    def customize_block_spec(self, block) -> None:
        """Put the fused modules into the local spec's ``TransformerBlockSubmodules`` (in place)."""
        if self.use_transformer_engine:
            return
        if self.norm == "liger":
            from megatron_exact.model.liger import rms_norm_class

            block.layer_norm = rms_norm_class()
        for spec in {id(s): s for s in block.layer_specs}.values():
            if self.norm == "liger":
                spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = block.layer_norm
            if self.swiglu == "liger":
                from megatron_exact.model.liger import LigerSwiGLU

                spec.submodules.mlp.submodules.activation_func = LigerSwiGLU

    def describe(self) -> str:
        loss = {"plain": "plain (Megatron-Core vocab-parallel CE over full logits)",
                "chunked": f"fused, chunked vocab-parallel CE ({self.chunk_tokens} tokens per chunk, no full logits)",
                "liger": "fused, liger fused linear CE (no full logits)"}[self.loss]
        parts = [
            f"spec {self.transformer_impl} ({self.reasons['transformer_impl']})",
            f"attention {self.attention} ({self.reasons['attention']})",
            f"norm {self.norm} ({self.reasons['norm']})",
            f"swiglu {self.swiglu} ({self.reasons['swiglu']})",
            f"loss {loss} ({self.reasons['loss']})",
        ]
        return "model paths: " + "; ".join(parts)

    def record(self) -> dict:
        """The choices, for benchmark and metrics records."""
        return {"transformer_impl": self.transformer_impl, "attention": self.attention, "norm": self.norm,
                "swiglu": self.swiglu, "loss": self.loss}


def select_paths(request: PathRequest, environment: Optional[Environment] = None) -> ModelPaths:
    """The implementations for ``request`` on ``environment`` (default: this machine)."""
    env = environment or Environment.detect()
    reasons = {}
    if request.transformer_impl not in TRANSFORMER_IMPLS:
        raise PathError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {request.transformer_impl!r}")
    if request.transformer_impl == "transformer_engine":
        if not env.transformer_engine:
            raise PathError("--transformer-impl transformer_engine: Transformer Engine is not importable here "
                            "(it needs CUDA and the transformer_engine package); use --transformer-impl local")
        reasons["transformer_impl"] = "--transformer-impl transformer_engine; untested in this project"
        attention = "TE DotProductAttention (THD padding_causal)"
        reasons["attention"] = reasons["norm"] = reasons["swiglu"] = "Transformer Engine's spec"
        norm = swiglu = "transformer_engine"
    else:
        reasons["transformer_impl"] = "--transformer-impl local (default)"
        attention, reasons["attention"] = _local_attention(request, env)
        norm, reasons["norm"] = _liger_or_torch(env, request.norm_fusion, "--no-norm-fusion")
        swiglu, reasons["swiglu"] = _liger_or_torch(env, request.bias_swiglu_fusion, "--no-bias-swiglu-fusion")
    loss, reasons["loss"] = _loss(request, env)
    if request.cross_entropy_chunk_tokens < 1:
        raise PathError(f"--cross-entropy-chunk-tokens must be positive, got {request.cross_entropy_chunk_tokens}")
    return ModelPaths(request.transformer_impl, attention, norm, swiglu, loss, request.cross_entropy_chunk_tokens,
                      reasons)


def _local_attention(request: PathRequest, env: Environment) -> tuple[str, str]:
    why_not = []
    if not env.cuda:
        why_not.append("no CUDA")
    elif not env.varlen_attention:
        why_not.append(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if not request.bf16:
        why_not.append("fp32 run (varlen needs bf16)")
    if request.context_parallel_size > 1:
        why_not.append("context parallelism")
    if request.attention_dropout > 0:
        why_not.append("attention dropout")
    if why_not:
        return "per-document SDPA", ", ".join(why_not)
    return "flash varlen", "one call per packed row"


def _liger_or_torch(env: Environment, wanted: bool, off_flag: str) -> tuple[str, str]:
    if not wanted:
        return "torch", off_flag
    if not env.liger:
        return "torch", env.liger_missing
    return "liger", "CUDA and liger-kernel installed"


def _loss(request: PathRequest, env: Environment) -> tuple[str, str]:
    fusion, impl, tp = request.cross_entropy_loss_fusion, request.cross_entropy_fusion_impl, request.tensor_model_parallel_size
    if impl is not None and impl not in CROSS_ENTROPY_FUSION_IMPLS:
        raise PathError(f"--cross-entropy-fusion-impl must be one of {CROSS_ENTROPY_FUSION_IMPLS}, got {impl!r}")
    if fusion is False:
        if impl is not None:
            raise PathError(f"--cross-entropy-fusion-impl {impl} contradicts --no-cross-entropy-loss-fusion")
        return "plain", "--no-cross-entropy-loss-fusion"
    if fusion is None and impl is None and not env.cuda:
        return "plain", "no CUDA: the plain path is the reference; --cross-entropy-loss-fusion forces the fused one"
    why = "--cross-entropy-loss-fusion" if fusion else ("--cross-entropy-fusion-impl" if impl else "default on CUDA")
    if impl == "liger":
        if not env.liger:
            raise PathError(f"--cross-entropy-fusion-impl liger: {env.liger_missing}")
        if tp > 1:
            raise PathError("--cross-entropy-fusion-impl liger has no vocabulary parallelism: use it with "
                            "--tensor-model-parallel-size 1, or 'chunked'")
        return "liger", why
    if impl is not None:
        return impl, why
    if env.liger and tp == 1:
        return "liger", why + ", liger-kernel installed, TP=1"
    reason = env.liger_missing if not env.liger else "TP > 1 (liger's CE has no vocabulary parallelism)"
    return "chunked", f"{why}; not liger: {reason}"


def add_path_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The implementation flags (Megatron-LM's names where it has the concept)."""
    group = parser.add_argument_group("implementations (one log line at start says which ran and why)")
    group.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local",
                       help="layer spec: local (Megatron-Core's, with packed-document attention; default) or "
                            "transformer_engine (TE's spec with THD attention; needs TE; untested in this project)")
    group.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction, default=None,
                       help="output layer + cross-entropy without full-vocabulary logits (default: on with CUDA, "
                            "off on CPU where the plain path is the reference)")
    group.add_argument("--cross-entropy-fusion-impl", choices=CROSS_ENTROPY_FUSION_IMPLS,
                       help="liger (CUDA, TP=1; default there when installed) or chunked (any device and TP; "
                            "default otherwise)")
    group.add_argument("--cross-entropy-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                       help="tokens per chunk of the chunked implementation")
    group.add_argument("--no-norm-fusion", dest="norm_fusion", action="store_false",
                       help="torch's RMSNorm instead of liger-kernel's (local spec, CUDA)")
    group.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                       help="unfused SwiGLU instead of liger-kernel's (local spec, CUDA)")
    return parser


def path_request_from_args(args: argparse.Namespace) -> PathRequest:
    return PathRequest(
        transformer_impl=args.transformer_impl,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        cross_entropy_chunk_tokens=args.cross_entropy_chunk_tokens,
        norm_fusion=args.norm_fusion,
        bias_swiglu_fusion=args.bias_swiglu_fusion,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        bf16=args.bf16,
        attention_dropout=args.attention_dropout,
    )
