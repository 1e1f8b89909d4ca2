"""Model architectures: named presets and a builder from a local HF ``config.json``.

The dense families the project trains (RMSNorm, SwiGLU, GQA, RoPE) are
described in :mod:`megatron_exact.model.families` (QKV bias, QK-norm, fields
each refuses); this module reads a ``config.json`` through those descriptions.
Everything here is plain data: turning an architecture into a Megatron-Core
``TransformerConfig``/``GPTModel`` lives in :mod:`megatron_exact.model.builder`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megatron_exact.errors import read_json
from megatron_exact.model.families import (
    LLAMA,
    MISTRAL,
    MOE_FIELDS,
    QWEN2,
    QWEN3,
    ModelFamily,
    UnsupportedModelError,
    get_family,
)

__all__ = ["PRESETS", "ModelArch", "RopeScaling", "UnsupportedModelError", "arch_from_hf_config", "get_preset"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.x ("llama3") RoPE frequency scaling."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """Architecture of a dense decoder-only model, in HF terms."""

    family: str  # the HF model_type of a family in megatron_exact.model.families
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    tie_word_embeddings: bool
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    # RoPE beyond rotary_base: llama3 frequency scaling, and linear position interpolation
    # (positions divided by the factor; HF's rope_type "linear"). Both are context extension.
    rope_scaling: Optional[RopeScaling] = None
    rotary_seq_len_interpolation_factor: Optional[float] = None
    # The HF config's attention window, where one is in effect. The Megatron model attends to the
    # whole document, which equals the window only up to it: the trainer requires --seq-length <= it.
    sliding_window: Optional[int] = None

    def __post_init__(self):
        get_family(self.family)  # an unknown family is refused by name, wherever the record comes from
        if self.head_dim is not None and self.head_dim == self.hidden_size // self.num_attention_heads:
            object.__setattr__(self, "head_dim", None)  # one spelling of the default, so that equal archs compare equal

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)

    @property
    def add_qkv_bias(self) -> bool:
        return self.model_family.add_qkv_bias

    @property
    def qk_layernorm(self) -> bool:
        return self.model_family.qk_layernorm

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)


def _qwen25(layers, hidden, ffn, heads, groups, max_pos, tie, vocab=151936) -> ModelArch:
    return ModelArch(
        family=QWEN2.model_type, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab,
        max_position_embeddings=max_pos, rotary_base=1000000.0, norm_epsilon=1e-6,
        tie_word_embeddings=tie,
    )


def _llama3(layers, hidden, ffn, heads, groups, tie, rope_factor) -> ModelArch:
    return ModelArch(
        family=LLAMA.model_type, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=128256,
        max_position_embeddings=131072, rotary_base=500000.0, norm_epsilon=1e-5,
        tie_word_embeddings=tie, rope_scaling=RopeScaling(factor=rope_factor),
    )


def _qwen3(layers, hidden, ffn, heads, tie) -> ModelArch:
    return ModelArch(
        family=QWEN3.model_type, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=8, vocab_size=151936, max_position_embeddings=40960,
        rotary_base=1000000.0, norm_epsilon=1e-6, tie_word_embeddings=tie, head_dim=128,
    )


PRESETS: dict[str, ModelArch] = {
    "qwen2.5-0.5b": _qwen25(24, 896, 4864, 14, 2, 32768, tie=True),
    "qwen2.5-1.5b": _qwen25(28, 1536, 8960, 12, 2, 131072, tie=True),
    "qwen2.5-3b": _qwen25(36, 2048, 11008, 16, 2, 32768, tie=True),
    "qwen2.5-7b": _qwen25(28, 3584, 18944, 28, 4, 131072, tie=False, vocab=152064),
    "llama3.2-1b": _llama3(16, 2048, 8192, 32, 8, tie=True, rope_factor=32.0),
    "llama3.2-3b": _llama3(28, 3072, 8192, 24, 8, tie=True, rope_factor=32.0),
    "llama3.1-8b": _llama3(32, 4096, 14336, 32, 8, tie=False, rope_factor=8.0),
    "qwen3-0.6b": _qwen3(28, 1024, 3072, 16, tie=True),
    "qwen3-1.7b": _qwen3(28, 2048, 6144, 16, tie=True),
    "qwen3-4b": _qwen3(36, 2560, 9728, 32, tie=True),
    "qwen3-8b": _qwen3(36, 4096, 12288, 32, tie=False),
    "mistral-7b-v0.3": ModelArch(
        family=MISTRAL.model_type, num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=32768, max_position_embeddings=32768, rotary_base=1000000.0,
        norm_epsilon=1e-5, tie_word_embeddings=False,
    ),
    # Tiny models for tests and the CPU quickstart: same families, toy sizes.
    "tiny-qwen2": ModelArch(
        family=QWEN2.model_type, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=256, max_position_embeddings=4096, rotary_base=10000.0,
        norm_epsilon=1e-6, tie_word_embeddings=True,
    ),
    "tiny-llama3": ModelArch(
        family=LLAMA.model_type, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=256, max_position_embeddings=4096, rotary_base=500000.0,
        norm_epsilon=1e-5, tie_word_embeddings=False,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=1024),
    ),
    # QK-norm and a head_dim (32) other than hidden_size / heads (16), as in Qwen3-0.6B.
    "tiny-qwen3": ModelArch(
        family=QWEN3.model_type, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=256, max_position_embeddings=4096, rotary_base=1000000.0,
        norm_epsilon=1e-6, tie_word_embeddings=True, head_dim=32,
    ),
}


def get_preset(name: str) -> ModelArch:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--model {name!r} is not a known preset; choose one of: {', '.join(PRESETS)}") from None


def arch_from_hf_config(config: dict | str | Path) -> ModelArch:
    """Architecture from a HF ``config.json`` (a dict, the file, or its directory).

    Refuses, with a message naming the field, anything the Megatron model would
    silently compute differently: families without a description, MoE, RoPE
    scaling types other than "llama3" and "linear", and each family's own
    refusals (:meth:`ModelFamily.check_config`). A sliding window in effect is
    recorded (``sliding_window``): whether it equals full attention depends on
    the training sequence length, which the trainer checks.
    """
    source = "config"
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        source = str(path)
        config = read_json(path)

    def fail(msg):
        raise UnsupportedModelError(f"{source}: {msg}")

    try:
        family = get_family(config.get("model_type"))
    except UnsupportedModelError as err:
        fail(str(err))
    for moe_field in MOE_FIELDS:
        if config.get(moe_field):
            fail(f"mixture-of-experts models ({moe_field}={config[moe_field]}) are not supported")
    family.check_config(config, fail)
    window = family.sliding_window(config, config["num_hidden_layers"])
    if window is not None and window[1] is None:
        fail(f"{window[0]} asks for sliding-window attention but gives no window (sliding_window, "
             "use_sliding_window): not supported")

    rope_theta = config.get("rope_theta")
    rope_scaling = interpolation = None
    scaling = config.get("rope_scaling") or None
    scaling_field = "rope_scaling"  # named in errors: the field the user's file spells
    # transformers 5 folds rope_theta into rope_parameters; accept both spellings.
    params = config.get("rope_parameters") or None
    if params:
        rope_theta = params.get("rope_theta", rope_theta)
        if params.get("rope_type", "default") != "default":
            scaling, scaling_field = params, "rope_parameters"
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
    if rope_type == "linear":
        interpolation = float(scaling["factor"])
    elif rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    elif rope_type != "default":
        fail(f"{scaling_field} type {rope_type!r} is not supported (only 'llama3' and 'linear')")
    heads = config["num_attention_heads"]
    return ModelArch(
        family=family.model_type,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_position_embeddings"],
        rotary_base=float(rope_theta if rope_theta is not None else 10000.0),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim"),
        rope_scaling=rope_scaling,
        rotary_seq_len_interpolation_factor=interpolation,
        sliding_window=None if window is None else int(window[1]),
    )
