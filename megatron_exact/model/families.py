"""Model families: one description per supported HF architecture, as data.

Everything that differs between the dense decoder families this project trains
lives here: the HF names (``model_type``, the ``architectures`` class), what the
attention has (QKV bias, QK-norm), which ``config.json`` fields a family
requires or refuses, how it spells a sliding window, and what its
``config.json`` is written back with. The HF-config builder
(:mod:`megatron_exact.model.config`), the Megatron model builder, the
converter's name map (:mod:`megatron_exact.convert.hf_mapping`), the presets
and the test helpers read these descriptions; nothing else compares family
names, and a family without a description is refused by name
(:func:`get_family`).

What every family shares is not repeated per family: RMSNorm, SwiGLU MLP
without biases, GQA, RoPE (read and written by the config builder and the
exporter, whatever the family), untied or tied embeddings as the checkpoint
says.

To add a family: a :class:`ModelFamily` below and its entry in
:data:`FAMILIES`, presets (if any) in ``model/config.py``, a tiny random HF
model in ``tests/convert/tiny_hf_models.py`` (the conversion, logit and
round-trip tests then cover it) and, if it adds parameters, their names in
``convert/hf_mapping.py`` and the TE-spec key fixture.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping, Optional

from megatron_exact.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """The HF config (or a checkpoint's record) describes something this project does not implement."""


# (field that puts the window in effect, window in tokens) or None: full attention.
SlidingWindow = Optional[tuple[str, Optional[int]]]

# Fields of every family's config.json whose value the Megatron model hard-codes
# (read: absent or equal, else refused; written back on export).
COMMON_FIXED_FIELDS = MappingProxyType({"hidden_act": "silu"})
# Mixture-of-experts fields (any family): a non-zero value is refused.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def _full_attention(config: dict, num_layers: int) -> SlidingWindow:
    return None


def _write_no_window(config: dict, window: Optional[int], num_layers: int) -> None:
    if window is not None:
        raise UnsupportedModelError(f"this family has no sliding-window attention, but the model records a window of {window}")


# transformers' default ``sliding_window`` when the field is absent (Qwen2/Qwen3/Mistral configs).
_HF_DEFAULT_WINDOW = 4096
_HF_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2/Qwen3


def _qwen_window(config: dict, num_layers: int) -> SlidingWindow:
    """Qwen2/Qwen3: ``use_sliding_window`` with layers from ``max_window_layers`` on, or explicit ``layer_types``."""
    use = bool(config.get("use_sliding_window", False))
    window = config.get("sliding_window", _HF_DEFAULT_WINDOW)
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if "sliding_attention" in layer_types:
            return ("use_sliding_window", window) if use else ("layer_types", None)
        return None
    if use and window is not None and num_layers > config.get("max_window_layers", _HF_DEFAULT_MAX_WINDOW_LAYERS):
        return "use_sliding_window", window
    return None


def _write_qwen_window(config: dict, window: Optional[int], num_layers: int) -> None:
    if window is None:
        config.update(use_sliding_window=False, layer_types=["full_attention"] * num_layers)
    elif (_qwen_window(config, num_layers) or (None, None))[1] != window:
        # No recorded config that spells this window (e.g. a window changed by hand): every layer slides.
        config.update(use_sliding_window=True, sliding_window=window, max_window_layers=0,
                      layer_types=["sliding_attention"] * num_layers)


def _mistral_window(config: dict, num_layers: int) -> SlidingWindow:
    window = config.get("sliding_window", _HF_DEFAULT_WINDOW)
    return None if window is None else ("sliding_window", window)


def _write_mistral_window(config: dict, window: Optional[int], num_layers: int) -> None:
    config["sliding_window"] = window


@dataclasses.dataclass(frozen=True, eq=False)  # one object per family: compared by identity
class ModelFamily:
    """What distinguishes one HF decoder family from the others here."""

    model_type: str  # HF config.json ``model_type``; also ``ModelArch.family`` and the checkpoint record
    architecture: str  # HF ``architectures`` entry (the transformers class)
    title: str  # for messages and the README
    add_qkv_bias: bool  # q/k/v projections have biases (o_proj never does)
    qk_layernorm: bool  # RMSNorm over each head's q and k before RoPE (Megatron-Core's qk_layernorm)
    # HF fields whose value this family's Megatron model hard-codes: read -> absent or equal, written on export.
    fixed_fields: Mapping[str, object] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    # HF fields without which transformers would assume something the generic reading does not.
    required_fields: tuple[str, ...] = ()
    # Related HF model_types (mixture-of-experts variants) refused with a message of their own.
    moe_model_types: tuple[str, ...] = ()
    # Where the family's config.json puts a sliding window in effect, and how it is written back.
    sliding_window: Callable[[dict, int], SlidingWindow] = _full_attention
    write_sliding_window: Callable[[dict, Optional[int], int], None] = _write_no_window
    sliding_window_fields: str = ""  # for messages: the fields that decide the window

    def check_config(self, config: dict, fail: Callable[[str], None]) -> None:
        """Refuse (through ``fail``) what this family's Megatron model would compute differently."""
        for field in self.required_fields:
            if config.get(field) is None:
                fail(f"{self.title} config lacks {field!r} (transformers would assume its own default): add it")
        for field, expected in {**COMMON_FIXED_FIELDS, **self.fixed_fields}.items():
            if field in config and config[field] != expected:
                fail(f"{field}={config[field]!r} is not supported for {self.title} (only {expected!r})")

    def write_config(self, config: dict, sliding_window: Optional[int], num_layers: int) -> None:
        """The family's own fields of an exported ``config.json`` (the generic ones are the exporter's)."""
        config.update(architectures=[self.architecture], model_type=self.model_type)
        config.update(COMMON_FIXED_FIELDS)
        config.update(self.fixed_fields)
        self.write_sliding_window(config, sliding_window, num_layers)


QWEN2 = ModelFamily(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    title="Qwen2/Qwen2.5",
    add_qkv_bias=True,
    qk_layernorm=False,
    moe_model_types=("qwen2_moe",),
    sliding_window=_qwen_window,
    write_sliding_window=_write_qwen_window,
    sliding_window_fields="use_sliding_window/layer_types (window: sliding_window)",
)
LLAMA = ModelFamily(
    model_type="llama",
    architecture="LlamaForCausalLM",
    title="LLaMA-3.x",
    add_qkv_bias=False,
    qk_layernorm=False,
    fixed_fields=MappingProxyType({"attention_bias": False, "mlp_bias": False}),
)
QWEN3 = ModelFamily(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    title="Qwen3",
    add_qkv_bias=False,
    qk_layernorm=True,
    fixed_fields=MappingProxyType({"attention_bias": False}),
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size // num_attention_heads.
    required_fields=("head_dim",),
    moe_model_types=("qwen3_moe",),
    sliding_window=_qwen_window,
    write_sliding_window=_write_qwen_window,
    sliding_window_fields="use_sliding_window/layer_types (window: sliding_window)",
)
MISTRAL = ModelFamily(
    model_type="mistral",
    architecture="MistralForCausalLM",
    title="Mistral",
    add_qkv_bias=False,
    qk_layernorm=False,
    moe_model_types=("mixtral",),
    sliding_window=_mistral_window,
    write_sliding_window=_write_mistral_window,
    sliding_window_fields="sliding_window",
)

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({f.model_type: f for f in (QWEN2, LLAMA, QWEN3, MISTRAL)})


def supported() -> str:
    return ", ".join(FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The description of family ``name`` (an HF ``model_type``); refuses an unknown one by name."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        pass
    for family in FAMILIES.values():
        if name in family.moe_model_types:
            raise UnsupportedModelError(
                f"model_type {name!r} is the mixture-of-experts variant of {family.title}: only dense models are "
                f"supported (model_type {family.model_type!r})"
            )
    raise UnsupportedModelError(f"model_type {name!r} is not supported (supported: {supported()})")
