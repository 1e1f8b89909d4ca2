"""GPU equality of the fused kernels with the unfused modules (needs CUDA; liger-kernel for its checks).

Every check compares the fused and the unfused computation with a float64
reference of the same inputs and passes when the fused error is at most twice
the unfused one, or within a floor of a few rounding steps of its dtype
(``FLOOR``, relative to the reference's largest value): bf16 kernels do not
round like torch's, so bitwise equality is not the bar, "no less accurate" is.

* RMSNorm: liger's ``LigerMegatronRMSNorm`` vs our ``LocalRMSNorm`` (output, input and weight gradients)
* SwiGLU: our ``LigerSwiGLU`` (the MLP activation slot) vs ``silu(gate) * up``
* output loss: ``FusedOutputLoss`` ``liger`` and ``chunked`` vs Megatron-Core's
  ``vocab_parallel_cross_entropy`` over materialised logits (per-token losses,
  hidden and weight gradients under random per-token weights), Qwen2.5-0.5B's
  vocabulary and width
* whole model: tiny-qwen2 built with this GPU's paths (liger norm, SwiGLU and
  loss) vs all fusions off, same weights, fp32: per-token losses and gradients

    python tests/gpu/kernel_check.py [--out results.json]

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # relative to max |reference|: ~4 bf16 rounding steps


def judge(name: str, dtype, fused, unfused, reference, results: dict, floor: float = None) -> None:
    for part, (f, u, r) in enumerate(zip(fused, unfused, reference)):
        scale = float(r.abs().max()) or 1.0
        fused_error = float((f.double() - r).abs().max()) / scale
        unfused_error = float((u.double() - r).abs().max()) / scale
        limit = max(2 * unfused_error, floor or FLOOR[dtype])
        key = f"{name}[{part}] {str(dtype).replace('torch.', '')}"
        results[key] = {"fused_rel_error": fused_error, "unfused_rel_error": unfused_error, "limit": limit,
                        "ok": fused_error <= limit}
        print(f"{key:<40} fused {fused_error:.3e}  unfused {unfused_error:.3e}  limit {limit:.3e}  "
              f"{'ok' if fused_error <= limit else 'FAIL'}", flush=True)


def grads_of(function, inputs, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = function(*leaves)
    out.backward(grad_output.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_rms_norm(config_for, results, liger_ok):
    from megatron_exact.model.builder import LocalRMSNorm
    from megatron_exact.model.liger import rms_norm_class

    hidden = 896
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2, hidden, device="cuda", generator=generator)
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)
    grad = torch.randn(4096, 2, hidden, device="cuda", generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        modules = {}
        for name, cls in (("torch", LocalRMSNorm), ("liger", rms_norm_class() if liger_ok else None)):
            if cls is None:
                continue
            module = cls(config_for(dtype), hidden, eps=1e-6).cuda().to(dtype)
            with torch.no_grad():
                module.weight.copy_(weight)
            modules[name] = module

        def run(module, dtype_):
            leaf = x.detach().to(dtype_).requires_grad_()
            out = module(leaf)
            out.backward(grad.to(out.dtype))
            result = [out.detach(), leaf.grad, module.weight.grad]
            module.weight.grad = None
            return result

        reference_module = LocalRMSNorm(config_for(torch.float32), hidden, eps=1e-6).cuda().double()
        with torch.no_grad():
            reference_module.weight.copy_(weight)
        reference = run(reference_module, torch.float64)
        if "liger" in modules:
            judge("rms_norm", dtype, run(modules["liger"], dtype), run(modules["torch"], dtype), reference, results)


def check_swiglu(results, config):
    from megatron_exact.model.liger import LigerSwiGLU

    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, 2, 2 * 4864, device="cuda", generator=generator)
    grad = torch.randn(4096, 2, 4864, device="cuda", generator=generator)

    def unfused(t):
        gate, up = torch.chunk(t, 2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    fused = LigerSwiGLU(config)
    for dtype in (torch.float32, torch.bfloat16):
        judge("swiglu", dtype, grads_of(fused, [x.to(dtype)], grad), grads_of(unfused, [x.to(dtype)], grad),
              grads_of(unfused, [x.double()], grad), results)


def check_output_loss(results, liger_ok):
    from megatron.core import tensor_parallel

    from megatron_exact.model.output_loss import FusedOutputLoss

    tokens, width, vocab = 2048, 896, 151936
    generator = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(tokens, 1, width, device="cuda", generator=generator)
    weight = 0.02 * torch.randn(vocab, width, device="cuda", generator=generator)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=generator)
    token_weights = 2 * torch.rand(1, tokens, device="cuda", generator=generator)

    def plain(h, w):
        logits = torch.matmul(h, w.t())  # [s, 1, V], as the output layer makes them
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t()).t()  # [1, s]

    def run(function, dtype_):
        h = hidden.detach().to(dtype_).requires_grad_()
        w = weight.detach().to(dtype_).requires_grad_()
        losses = function(h, w)
        (losses.double() * token_weights.double()).sum().backward()
        return [losses.detach(), h.grad, w.grad]

    reference = run(plain, torch.float64)
    impls = ["chunked"] + (["liger"] if liger_ok else [])
    for dtype in (torch.float32, torch.bfloat16):
        unfused = run(plain, dtype)
        for impl in impls:
            fused_loss = FusedOutputLoss(impl=impl)
            fused = run(lambda h, w: fused_loss(h, w, labels, sequence_parallel=False), dtype)
            judge(f"output_loss {impl}", dtype, fused, unfused, reference, results)


def check_model(results):
    from megatron_exact.loss import ExactConfig, ExactLoss
    from megatron_exact.model.builder import build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.model.paths import PathRequest, select_paths
    from tests.output_loss_check import SEQ, TAU, packed_microbatch

    arch = get_preset("tiny-qwen2")
    packed = packed_microbatch()
    params = packed.packed_seq_params
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        setattr(params, name, getattr(params, name).cuda())
    packed_on_gpu = {name: getattr(packed, name).cuda() for name in ("tokens", "labels", "loss_mask", "position_ids")}
    models = {}
    for name, request in (("fused", PathRequest()), ("unfused", PathRequest(
            norm_fusion=False, bias_swiglu_fusion=False, cross_entropy_loss_fusion=False))):
        paths = select_paths(request)
        print(f"tiny-qwen2 {name}: {paths.describe()}", flush=True)
        config = transformer_config(arch, **paths.config_overrides())
        models[name] = build_gpt_model(arch, config, seq_length=SEQ, paths=paths).cuda()
    models["fused"].load_state_dict(models["unfused"].state_dict())
    outputs = {}
    for name, model in models.items():
        loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU), SEQ)
        loss.begin_step([packed])
        token_losses = model(packed_on_gpu["tokens"], packed_on_gpu["position_ids"], None,
                             labels=packed_on_gpu["labels"], packed_seq_params=packed.packed_seq_params)
        value, _, _ = loss.loss_func(packed, token_losses)
        value.backward()
        outputs[name] = [token_losses.detach()] + [p.grad for _, p in sorted(model.named_parameters())]
    # fp32 both ways: the reference is the unfused model itself; two layers of differently rounded
    # fp32 kernels, then the backward pass: 1e-4 of the largest value.
    judge("model tiny-qwen2", torch.float32, outputs["fused"], outputs["unfused"],
          [t.double() for t in outputs["unfused"]], results, floor=1e-4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tests/gpu/kernel_check.py: needs a CUDA GPU")
        return 2
    from megatron_exact.model.builder import transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.model.paths import Environment
    from megatron_exact.platform.distributed import initialize_model_parallel

    initialize_model_parallel(1, 1, 1)
    environment = Environment.detect()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; liger: "
          f"{'yes' if environment.liger else environment.liger_missing}", flush=True)
    arch = get_preset("qwen2.5-0.5b")
    results = {}
    check_output_loss(results, environment.liger)
    if environment.liger:
        check_rms_norm(lambda dtype: transformer_config(arch, bf16=dtype == torch.bfloat16), results, True)
        check_swiglu(results, transformer_config(arch))
        check_model(results)
    record = {"liger": environment.liger, "liger_missing": environment.liger_missing, "checks": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    failed = [key for key, value in results.items() if not value["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
