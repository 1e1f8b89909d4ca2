"""Model families (megatron_exact/model/families.py): each description against transformers' own config
classes, the sliding-window rules, the refusals with their messages, and a mechanical check that no
other code names a family.

transformers is the independent reference here: its config class for a family's ``model_type``
(``AutoConfig.for_model``) must accept what we export and agree on the attention window.
"""

import ast
import re
from pathlib import Path

import pytest

from megatron_exact.model.config import ModelArch, UnsupportedModelError, arch_from_hf_config, get_preset
from megatron_exact.model.families import FAMILIES, MISTRAL, QWEN2, QWEN3, get_family

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512)


def transformers_config(model_type, **changes):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY, **changes})


def exported_config(arch):
    import torch

    from megatron_exact.convert.hf_mapping import hf_config_dict

    return hf_config_dict(arch, torch.float32)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_reads_and_writes_transformers_configs(model_type):
    family = FAMILIES[model_type]
    # head_dim given: Qwen3's default (128) is not hidden_size / heads; no window: Mistral's default has one.
    config = transformers_config(model_type, head_dim=16, sliding_window=None).to_dict()
    arch = arch_from_hf_config(config)
    assert arch.model_family is family and arch.sliding_window is None
    assert (arch.add_qkv_bias, arch.qk_layernorm) == (family.add_qkv_bias, family.qk_layernorm)
    written = exported_config(arch)
    assert written["model_type"] == model_type and written["architectures"] == [family.architecture]
    reloaded = transformers_config(model_type, **{k: v for k, v in written.items() if k != "model_type"})
    assert type(reloaded).__name__.replace("Config", "ForCausalLM") == family.architecture
    assert arch_from_hf_config(reloaded.to_dict()) == arch


@pytest.mark.parametrize(
    "model_type, changes, field, window",
    [
        (MISTRAL.model_type, dict(sliding_window=64), "sliding_window", 64),
        (QWEN2.model_type, dict(use_sliding_window=True, sliding_window=64, max_window_layers=1), "use_sliding_window", 64),
        (QWEN3.model_type, dict(use_sliding_window=True, sliding_window=48, max_window_layers=0, head_dim=16),
         "use_sliding_window", 48),
        (QWEN3.model_type, dict(use_sliding_window=True, sliding_window=48,
                                layer_types=["full_attention", "sliding_attention"], head_dim=16),
         "use_sliding_window", 48),
    ],
)
def test_a_window_in_effect_is_recorded_and_written_back(model_type, changes, field, window):
    config = transformers_config(model_type, **changes)
    sliding_layers = [t == "sliding_attention" for t in getattr(config, "layer_types", None) or []]
    assert config.sliding_window == window and (sliding_layers == [] or any(sliding_layers))  # transformers agrees
    family = FAMILIES[model_type]
    assert family.sliding_window(config.to_dict(), TINY["num_hidden_layers"]) == (field, window)
    arch = arch_from_hf_config(config.to_dict())
    assert arch.sliding_window == window
    # A config built from the checkpoint record alone (no recorded HF config) spells the same window.
    reloaded = transformers_config(model_type, **{k: v for k, v in exported_config(arch).items() if k != "model_type"})
    assert reloaded.sliding_window == window
    assert arch_from_hf_config(reloaded.to_dict()) == arch


@pytest.mark.parametrize(
    "model_type, changes",
    [
        (MISTRAL.model_type, dict(sliding_window=None)),
        # Qwen2.5's published configs: a window value, but use_sliding_window false.
        (QWEN2.model_type, dict(use_sliding_window=False, sliding_window=32768, max_window_layers=21)),
        # use_sliding_window with every layer below max_window_layers: transformers slides none.
        (QWEN3.model_type, dict(use_sliding_window=True, sliding_window=64, max_window_layers=28, head_dim=16)),
    ],
)
def test_no_window_in_effect(model_type, changes):
    config = transformers_config(model_type, **changes)
    assert "sliding_attention" not in (getattr(config, "layer_types", None) or [])
    assert arch_from_hf_config(config.to_dict()).sliding_window is None


def test_mistral_window_default_is_transformers_default():
    """A Mistral config.json without ``sliding_window`` gets transformers' default window, not full attention."""
    config = transformers_config(MISTRAL.model_type).to_dict()
    default = config.pop("sliding_window")
    assert default is not None
    assert arch_from_hf_config(config).sliding_window == default


def test_sliding_layers_without_a_window_are_refused():
    config = transformers_config(QWEN2.model_type).to_dict()
    config.update(use_sliding_window=False, layer_types=["sliding_attention"] * 2)
    with pytest.raises(UnsupportedModelError, match="layer_types asks for sliding-window attention but gives no window"):
        arch_from_hf_config(config)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_mixture_of_experts_variants_are_refused_by_name(family):
    for moe_type in family.moe_model_types:
        with pytest.raises(UnsupportedModelError, match=re.escape(
                f"config: model_type '{moe_type}' is the mixture-of-experts variant of {family.title}: only dense "
                f"models are supported (model_type '{family.model_type}')")):
            arch_from_hf_config({**transformers_config(family.model_type, head_dim=16).to_dict(), "model_type": moe_type})


def test_unknown_family_is_refused_by_name_everywhere():
    supported = ", ".join(FAMILIES)
    message = f"model_type 'gemma2' is not supported (supported: {supported})"
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        get_family("gemma2")
    with pytest.raises(UnsupportedModelError, match=re.escape(f"config: {message}")):
        arch_from_hf_config({**transformers_config(QWEN2.model_type).to_dict(), "model_type": "gemma2"})
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        get_preset("tiny-qwen2").replace(family="gemma2")
    from megatron_exact.checkpoint import arch_from_dict, arch_to_dict

    record = {**arch_to_dict(get_preset("tiny-llama3")), "family": "gemma2"}
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        arch_from_dict(record)


def test_legacy_checkpoint_record_with_qkv_bias_reads_back():
    """Checkpoints written before family descriptions recorded ``add_qkv_bias``; it must agree with the family."""
    from megatron_exact.checkpoint import arch_from_dict, arch_to_dict

    arch = get_preset("tiny-qwen2")
    assert arch_from_dict({**arch_to_dict(arch), "add_qkv_bias": True}) == arch
    with pytest.raises(ValueError, match="add_qkv_bias=False for family"):
        arch_from_dict({**arch_to_dict(arch), "add_qkv_bias": False})


def _family_names():
    names = set()
    for family in FAMILIES.values():
        names.update({family.model_type, family.architecture, *family.moe_model_types})
    return names


# The family descriptions and this test are the only places that may spell a family.
ALLOWED = {REPO / "megatron_exact" / "model" / "families.py", Path(__file__).resolve()}


def test_no_family_literal_outside_the_family_descriptions():
    names = _family_names()
    offenders = []
    for root in ("megatron_exact", "tools", "tests", "bench", "examples"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.resolve() in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, "family names outside megatron_exact/model/families.py:\n" + "\n".join(offenders)


def test_the_mechanical_check_would_catch_a_literal(tmp_path):
    """The scan above finds a family comparison written the old way."""
    tree = ast.parse('if arch.family == "llama":\n    pass\n')
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in _family_names()]
    assert found == ["llama"]


def test_arch_family_is_a_description():
    arch = ModelArch(family=QWEN3.model_type, num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                     num_query_groups=1, vocab_size=8, max_position_embeddings=8, rotary_base=1e4, norm_epsilon=1e-6,
                     tie_word_embeddings=True, head_dim=4)
    assert arch.model_family is QWEN3 and arch.qk_layernorm and not arch.add_qkv_bias
    assert arch.head_dim is None  # 4 == hidden_size / heads: one spelling of the default
