"""Checkpoints move between Transformer Engine (GPU) and local-spec (CPU) runs.

Our local-spec model's distributed-checkpoint keys and global shapes must equal
the Transformer Engine spec's, committed in tests/fixtures/checkpoint_names/
(derived from Megatron-Core's TE spec without building our model; see the README
there). A checkpoint written by a TE model, with its FP8 ``_extra_state``
payloads and a core_attention ``_extra_state`` that older Megatron-Core versions
saved, must load into the local spec under dist_checkpointing's default
strictness.
"""

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoint_names"
PRESETS_WITH_FIXTURES = ("tiny-qwen2", "tiny-llama3", "tiny-qwen3")

# Megatron-side parameter names of Megatron-Bridge's Qwen2 <-> HF map (a TE-spec model), layer
# wildcards folded as in stacked distributed checkpoints:
# https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/ff83c84673d225992543659d0a65beeaf694f6ec/src/megatron/bridge/models/qwen/qwen2_bridge.py
BRIDGE_QWEN2_MEGATRON_NAMES = [
    "embedding.word_embeddings.weight",
    "output_layer.weight",  # only for untied embeddings
    "decoder.final_layernorm.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc2.weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_qkv.bias",
    "decoder.layers.mlp.linear_fc1.weight",
]

# Megatron-Bridge's Qwen3 map adds the QK-norm weights to those (no QKV bias):
# https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/067f987df03b8355b03192d88d70f1709fedf51a/src/megatron/bridge/models/qwen/qwen3_bridge.py
BRIDGE_QWEN3_QK_NORM_NAMES = [
    "decoder.layers.self_attention.q_layernorm.weight",
    "decoder.layers.self_attention.k_layernorm.weight",
]


def fixture_keys(name):
    return {key: shape for key, shape in json.loads((FIXTURES / f"te_spec_sharded_keys_{name}.json").read_text())}


def build_local_model(name, seed):
    from megatron.core import tensor_parallel

    from megatron_exact.model.builder import build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    arch = get_preset(name)
    return build_gpt_model(arch, transformer_config(arch), seq_length=64, use_transformer_engine=False)


def sharded_keys(model):
    """Key -> global shape, by the same helper the fixture's --from-te-model mode uses."""
    spec = importlib.util.spec_from_file_location("derive_te_keys", FIXTURES / "derive_te_keys.py")
    derive_te_keys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive_te_keys)
    return derive_te_keys.model_keys(model)


def test_bridge_parameter_names_are_in_the_fixture():
    qwen, llama = fixture_keys("tiny-qwen2"), fixture_keys("tiny-llama3")
    for key in BRIDGE_QWEN2_MEGATRON_NAMES:
        if key == "output_layer.weight":
            assert key not in qwen and key in llama  # tiny-qwen2 ties embeddings, tiny-llama3 does not
        elif key.endswith(".bias"):
            assert key in qwen and key not in llama  # QKV bias is Qwen2's only
        else:
            assert key in qwen and key in llama
    # Beyond parameters, a TE checkpoint holds only the linears' FP8 extra state.
    for keys in (qwen, llama):
        extras = {k for k in keys if k not in BRIDGE_QWEN2_MEGATRON_NAMES}
        assert all(k.endswith("._extra_state") for k in extras), extras


def test_bridge_qk_norm_names_are_in_the_qwen3_fixture():
    qwen3, qwen2 = fixture_keys("tiny-qwen3"), fixture_keys("tiny-qwen2")
    from megatron_exact.model.config import get_preset

    arch = get_preset("tiny-qwen3")
    for key in BRIDGE_QWEN3_QK_NORM_NAMES:
        assert qwen3[key] == [arch.num_layers, arch.kv_channels]  # one weight per layer, over one head
        assert key not in qwen2
    # Qwen3: the Qwen2 parameters without the QKV bias, plus the QK-norm weights.
    params = {k for k in qwen3 if not k.endswith("._extra_state")}
    expected = set(BRIDGE_QWEN2_MEGATRON_NAMES) - {"decoder.layers.self_attention.linear_qkv.bias", "output_layer.weight"}
    assert params == expected | set(BRIDGE_QWEN3_QK_NORM_NAMES)


@pytest.mark.parametrize("name", PRESETS_WITH_FIXTURES)
def test_local_spec_keys_and_shapes_equal_te_spec(single_process_group, name):
    assert sharded_keys(build_local_model(name, seed=1)) == fixture_keys(name)


def _te_like_extra_state():
    """What a TE linear saves as extra state (TE 2.x: pickled FP8 metadata in a uint8 tensor)."""
    buffer = io.BytesIO()
    torch.save({"extra_fp8_variables": {"num_gemms": 1}, "scale_fwd": torch.ones(3)}, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_te_checkpoint_loads_into_local_spec(single_process_group, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    name = "tiny-qwen2"
    source = build_local_model(name, seed=1)
    te_state = source.sharded_state_dict()
    for key, item in te_state.items():
        if key.endswith("._extra_state"):
            item.data = _te_like_extra_state()
    # Megatron-Core releases before TEDotProductAttention dropped it from checkpoints saved this too.
    # One object per layer, placed like that layer's linear_proj extra state.
    for key, item in list(te_state.items()):
        if key.endswith("linear_proj._extra_state"):
            te_state[key.replace("linear_proj", "core_attention")] = ShardedObject(
                "decoder.layers.self_attention.core_attention._extra_state", _te_like_extra_state(),
                item.global_shape, item.global_offset, item.replica_id,
            )
    checkpoint = tmp_path / "te_checkpoint"
    checkpoint.mkdir()
    dist_checkpointing.save({"model": te_state}, str(checkpoint))

    target = build_local_model(name, seed=2)
    assert not torch.equal(target.embedding.word_embeddings.weight, source.embedding.word_embeddings.weight)
    # Default strictness (Megatron-LM's --dist-ckpt-strictness assume_ok_unexpected): checkpoint
    # entries the model does not ask for are skipped.
    loaded = dist_checkpointing.load({"model": target.sharded_state_dict()}, str(checkpoint))
    target.load_state_dict(loaded["model"])
    source_params = dict(source.named_parameters())
    for param_name, param in target.named_parameters():
        assert torch.equal(param, source_params[param_name]), param_name

    # The only key the local model does not read is the legacy one: a fully strict load names it.
    with pytest.raises(Exception, match="core_attention._extra_state"):
        dist_checkpointing.load(
            {"model": build_local_model(name, seed=3).sharded_state_dict()}, str(checkpoint),
            strict=StrictHandling.RAISE_ALL,
        )
