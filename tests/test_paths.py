"""Implementation choice (megatron_exact.model.paths): what runs where, and why.

The machines this is decided on are described by hand (:class:`Environment`),
so the GPU cases are checked here on the CPU; the real detection on this
machine (no CUDA) must fall back with its reason. The kernels themselves are
compared with the unfused modules on a GPU (tests/gpu/).
"""

import pytest
import torch

from megatron_exact.platform import setup_platform

setup_platform()

from megatron_exact.model.paths import (  # noqa: E402
    Environment,
    PathError,
    PathRequest,
    path_request_from_args,
    select_paths,
)
from megatron_exact.training.arguments import build_parser  # noqa: E402

CPU = Environment(cuda=False, transformer_engine=False, liger=False, liger_missing="no CUDA (liger-kernel's kernels "
                  "are Triton)", varlen_attention=True)
GPU = Environment(cuda=True, transformer_engine=False, liger=False, liger_missing="liger-kernel is not installed",
                  varlen_attention=True)
GPU_LIGER = Environment(cuda=True, transformer_engine=False, liger=True, liger_missing="", varlen_attention=True)
GPU_TE = Environment(cuda=True, transformer_engine=True, liger=True, liger_missing="", varlen_attention=True)


def test_this_machine_falls_back_with_its_reason():
    paths = select_paths(PathRequest())
    assert (paths.transformer_impl, paths.attention, paths.norm, paths.swiglu, paths.loss) == (
        "local", "per-document SDPA", "torch", "torch", "plain")
    line = paths.describe()
    assert line.startswith("model paths: ")
    assert "no CUDA" in paths.reasons["attention"] and "no CUDA" in paths.reasons["norm"]
    assert "reference" in paths.reasons["loss"]
    assert paths.output_loss() is None
    assert paths.config_overrides() == {"bias_activation_fusion": False, "use_te_activation_func": False}


def test_cpu_can_force_the_fused_loss():
    paths = select_paths(PathRequest(cross_entropy_loss_fusion=True), CPU)
    assert paths.loss == "chunked" and "no CUDA" in paths.reasons["loss"]
    assert paths.output_loss().impl == "chunked"
    assert select_paths(PathRequest(cross_entropy_fusion_impl="chunked"), CPU).loss == "chunked"  # the impl implies it


def test_gpu_with_liger_fuses_everything_at_tp1():
    paths = select_paths(PathRequest(bf16=True), GPU_LIGER)
    assert (paths.attention, paths.norm, paths.swiglu, paths.loss) == ("flash varlen", "liger", "liger", "liger")
    assert paths.config_overrides() == {"bias_activation_fusion": False, "use_te_activation_func": True}


def test_gpu_fallbacks_name_their_reason():
    paths = select_paths(PathRequest(bf16=True), GPU)
    assert (paths.norm, paths.swiglu, paths.loss) == ("torch", "torch", "chunked")
    assert "liger-kernel is not installed" in paths.reasons["norm"]
    assert "liger-kernel is not installed" in paths.reasons["loss"]
    tp2 = select_paths(PathRequest(bf16=True, tensor_model_parallel_size=2), GPU_LIGER)
    assert tp2.loss == "chunked" and "TP > 1" in tp2.reasons["loss"]
    fp32 = select_paths(PathRequest(context_parallel_size=2, attention_dropout=0.1), GPU_LIGER)
    assert fp32.attention == "per-document SDPA"
    assert fp32.reasons["attention"] == "fp32 run (varlen needs bf16), context parallelism, attention dropout"


def test_flags_turn_each_fusion_off():
    paths = select_paths(PathRequest(bf16=True, norm_fusion=False, bias_swiglu_fusion=False,
                                     cross_entropy_loss_fusion=False), GPU_LIGER)
    assert (paths.norm, paths.swiglu, paths.loss) == ("torch", "torch", "plain")
    assert paths.reasons == {**paths.reasons, "norm": "--no-norm-fusion", "swiglu": "--no-bias-swiglu-fusion",
                             "loss": "--no-cross-entropy-loss-fusion"}
    assert select_paths(PathRequest(cross_entropy_fusion_impl="chunked"), GPU_LIGER).loss == "chunked"


def test_transformer_engine_spec_is_selectable_where_te_imports():
    paths = select_paths(PathRequest(transformer_impl="transformer_engine", bf16=True), GPU_TE)
    assert paths.use_transformer_engine and paths.norm == "transformer_engine"
    assert "untested" in paths.reasons["transformer_impl"]
    assert paths.config_overrides()["bias_activation_fusion"] is True


@pytest.mark.parametrize("request_, environment, message", [
    (PathRequest(transformer_impl="transformer_engine"), GPU, "--transformer-impl transformer_engine"),
    (PathRequest(cross_entropy_fusion_impl="liger"), CPU, "--cross-entropy-fusion-impl liger: no CUDA"),
    (PathRequest(cross_entropy_fusion_impl="liger", tensor_model_parallel_size=2), GPU_LIGER, "TP|tensor-model"),
    (PathRequest(cross_entropy_fusion_impl="te"), GPU_TE, "--cross-entropy-fusion-impl must be one of"),
    (PathRequest(cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="chunked"), CPU, "contradicts"),
    (PathRequest(cross_entropy_chunk_tokens=0), CPU, "--cross-entropy-chunk-tokens"),
])
def test_requests_this_machine_cannot_serve_are_errors(request_, environment, message):
    with pytest.raises(PathError, match=message):
        select_paths(request_, environment)


def test_flags_parse_into_the_request():
    base = ["--model", "tiny-qwen2", "--seq-length", "64", "--train-iters", "1", "--lr", "1e-3", "--data-path", "x"]
    default = path_request_from_args(build_parser().parse_args(base))
    assert default == PathRequest()
    args = build_parser().parse_args(base + ["--no-cross-entropy-loss-fusion", "--no-norm-fusion",
                                             "--no-bias-swiglu-fusion", "--transformer-impl", "transformer_engine",
                                             "--tensor-model-parallel-size", "2", "--bf16"])
    assert path_request_from_args(args) == PathRequest(
        transformer_impl="transformer_engine", cross_entropy_loss_fusion=False, norm_fusion=False,
        bias_swiglu_fusion=False, tensor_model_parallel_size=2, bf16=True)
    forced = build_parser().parse_args(base + ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "liger",
                                               "--cross-entropy-chunk-tokens", "512"])
    request = path_request_from_args(forced)
    assert (request.cross_entropy_loss_fusion, request.cross_entropy_fusion_impl,
            request.cross_entropy_chunk_tokens) == (True, "liger", 512)


class TorchSwiGLUKernel(torch.nn.Module):
    """What liger's SwiGLU kernel computes, in torch; counts its calls."""

    calls = 0

    def forward(self, fc1_output):
        TorchSwiGLUKernel.calls += 1
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        return torch.nn.functional.silu(gate) * up


def test_liger_slots_of_the_local_spec_are_wired(single_process_group, monkeypatch):
    """The spec slots the liger modules go into, with torch stand-ins for the kernels (they need a GPU:
    tests/gpu/): the model computes what the unfused one computes, the activation slot runs, and the
    checkpoint keys are the unfused model's."""
    from megatron_exact.loss import ExactConfig, ExactLoss
    from megatron_exact.model import liger
    from megatron_exact.model.builder import LocalRMSNorm, build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset
    from tests.output_loss_check import SEQ, TAU, packed_microbatch

    class StandInNorm(LocalRMSNorm):
        pass

    monkeypatch.setattr(liger, "rms_norm_class", lambda: StandInNorm)
    monkeypatch.setattr(liger.LigerSwiGLU, "kernel", staticmethod(TorchSwiGLUKernel))
    arch = get_preset("tiny-llama3")
    packed = packed_microbatch()
    outputs = {}
    for name, environment, request in (
            ("wired", GPU_LIGER, PathRequest(cross_entropy_fusion_impl="chunked")),
            ("plain", CPU, PathRequest())):
        paths = select_paths(request, environment)
        torch.manual_seed(0)
        model = build_gpt_model(arch, transformer_config(arch, **paths.config_overrides()), seq_length=SEQ,
                                paths=paths)
        if name == "plain":
            model.load_state_dict(outputs["wired"][2])
        norms = [m for m in model.modules() if isinstance(m, StandInNorm)]
        loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU), SEQ)
        loss.begin_step([packed])
        TorchSwiGLUKernel.calls = 0
        token_losses = model(packed.tokens, packed.position_ids, None, labels=packed.labels,
                             packed_seq_params=packed.packed_seq_params)
        loss.loss_func(packed, token_losses)[0].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        checkpoint_keys = sorted(model.sharded_state_dict())
        outputs[name] = (token_losses.detach(), grads, model.state_dict(), len(norms), TorchSwiGLUKernel.calls,
                         checkpoint_keys)
    wired, plain = outputs["wired"], outputs["plain"]
    assert (wired[3], wired[4]) == (2 * arch.num_layers + 1, arch.num_layers)  # every norm, every MLP
    assert (plain[3], plain[4]) == (0, 0)
    assert wired[5] == plain[5]  # same checkpoint keys: checkpoints move between fused and unfused runs
    torch.testing.assert_close(wired[0], plain[0], rtol=1e-5, atol=1e-5)
    for name, grad in plain[1].items():
        torch.testing.assert_close(wired[1][name], grad, rtol=1e-5, atol=1e-5)
