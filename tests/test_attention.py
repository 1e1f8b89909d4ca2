"""PackedDocumentAttention against a dense block-diagonal causal reference (fp32, max abs diff <= 1e-5).

The reference is written out here: float64 scores over the whole packed row,
masked so that position i sees position j only inside its own document and
for j <= i, grouped-query heads expanded by hand (query head h uses kv head
h // (heads / kv_heads)), gradients by autograd through that dense graph.

CP=1 runs in this process. CP=2 runs as a real two-process gloo job (this file
is its own worker: ``python -m torch.distributed.run --nproc-per-node=2
tests/test_attention.py --worker OUT``); the ranks' outputs and gradients are
put back into document order and compared with the same reference.
"""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the worker runs as a script
    sys.path.insert(0, str(REPO))

from megatron_exact.model.packing import batch_from_documents, pack_batch  # noqa: E402
from tests.launch import run_checked, torchrun_command  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
TOL = 1e-5

# Document lengths (summing to seq_length + 1 tokens of a sample): one-token
# documents at the start, middle and end, odd lengths for the CP padding path,
# and one document filling the whole sample.
CASES = {
    "mixed": [1, 9, 1, 1, 33, 2, 17, 64, 5, 1, 26, 1],
    "single": [161],
}


def dense_reference(q, k, v, doc_ids):
    """Block-diagonal causal attention in float64: q [T, H, D], k/v [T, G, D] -> [T, H, D]."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    kv_of_head = torch.arange(heads) // (heads // kv_heads)
    k, v = k[:, kv_of_head], v[:, kv_of_head]
    scores = torch.einsum("ihd,jhd->hij", q, k) / q.shape[-1] ** 0.5
    position = torch.arange(q.shape[0])
    allowed = (doc_ids[:, None] == doc_ids[None, :]) & (position[None, :] <= position[:, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def random_qkv_and_grad(num_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    grad_out = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
    return q, k, v, grad_out


def document_ids(lengths):
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])


def reference_with_grads(q, k, v, grad_out, doc_ids):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = dense_reference(*leaves, doc_ids)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def attention_module(context_parallel_size=1):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_exact.model.attention import PackedDocumentAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
        kv_channels=HEAD_DIM, attention_dropout=0.0, hidden_dropout=0.0,
        context_parallel_size=context_parallel_size,
    )
    return PackedDocumentAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


def packed_case(lengths, cp, rank):
    """The packed layout of a sample with these documents, plus each local position's
    index into the unpadded token order (-1 for padding)."""
    seq_length = sum(lengths) - 1
    # Token value = 1 + index into the sample, so the layout tells where each token came from.
    documents, start = [], 1
    for n in lengths:
        documents.append(list(range(start, start + n)))
        start += n
    packed = pack_batch(batch_from_documents(documents, seq_length), context_parallel_size=cp, context_parallel_rank=rank)
    return packed, packed.tokens[0] - 1, seq_length


def run_attention(module, q, k, v, grad_out, packed_seq_params):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = module(*leaves, None, packed_seq_params=packed_seq_params)
    out.backward(grad_out.reshape(out.shape))
    return out.detach().reshape(q.shape), [t.grad for t in leaves]


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_documents_match_dense_reference(single_process_group, case):
    lengths = CASES[case]
    packed, source, seq_length = packed_case(lengths, cp=1, rank=0)
    assert torch.equal(source, torch.arange(seq_length))  # CP=1: no padding, no reordering
    input_lengths = packed.packed_seq_params.cu_seqlens_q.diff().tolist()
    q, k, v, grad_out = random_qkv_and_grad(seq_length, seed=len(lengths))

    out, grads = run_attention(attention_module(), q, k, v, grad_out, packed.packed_seq_params)
    ref_out, ref_grads = reference_with_grads(q, k, v, grad_out, document_ids(input_lengths))

    assert out.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() <= TOL
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert (grad.double() - ref).abs().max() <= TOL, f"d{name}"


def test_one_token_documents_attend_only_to_themselves(single_process_group):
    """A length-1 document's output is exactly its own value vector (softmax over one key)."""
    lengths = [1, 1, 4, 1, 1]
    packed, _, seq_length = packed_case(lengths, cp=1, rank=0)
    q, k, v, grad_out = random_qkv_and_grad(seq_length, seed=3)
    out, _ = run_attention(attention_module(), q, k, v, grad_out, packed.packed_seq_params)
    for position in (0, 1, 6):
        expected = v[position].repeat_interleave(HEADS // KV_HEADS, dim=0)
        assert torch.allclose(out[position], expected, atol=1e-6)


def test_unpacked_sbhd_input_is_plain_causal_attention(single_process_group):
    """Without packed_seq_params each sample of [s, b, h, d] is one causal document."""
    s, b = 37, 2
    q, k, v, grad_out = random_qkv_and_grad(s * b, seed=7)
    to_sbhd = lambda t: t.reshape(b, s, *t.shape[1:]).transpose(0, 1).contiguous()  # noqa: E731
    out = attention_module()(to_sbhd(q), to_sbhd(k), to_sbhd(v), None)
    assert out.shape == (s, b, HEADS * HEAD_DIM)
    for sample in range(b):
        rows = slice(sample * s, (sample + 1) * s)
        ref = dense_reference(q[rows], k[rows], v[rows], torch.zeros(s, dtype=torch.long))
        assert (out[:, sample].reshape(s, HEADS, HEAD_DIM).double() - ref).abs().max() <= TOL


@pytest.mark.slow
def test_context_parallel_two_ranks_match_dense_reference(tmp_path):
    run_checked(torchrun_command(__file__, "--worker", tmp_path), timeout=240)

    for case, lengths in CASES.items():
        ranks = [torch.load(tmp_path / f"{case}_rank{r}.pt") for r in range(2)]
        seq_length = ranks[0]["seq_length"]
        input_lengths = ranks[0]["cu_seqlens"].diff().tolist()
        q, k, v, grad_out = random_qkv_and_grad(seq_length, seed=len(lengths))
        ref_out, ref_grads = reference_with_grads(q, k, v, grad_out, document_ids(input_lengths))

        # Reassemble: every real token appears on exactly one rank.
        out = torch.full_like(ref_out, float("nan"))
        grads = [torch.full_like(t, float("nan")) for t in ref_grads]
        seen = torch.zeros(seq_length, dtype=torch.long)
        for rank in ranks:
            real = rank["source"] >= 0
            index = rank["source"][real]
            seen[index] += 1
            out[index] = rank["out"][real].double()
            for full, local in zip(grads, rank["grads"]):
                full[index] = local[real].double()
            # Padding keys/values are never attended to: no gradient reaches them.
            assert torch.all(rank["grads"][1][~real] == 0) and torch.all(rank["grads"][2][~real] == 0)
        assert torch.all(seen == 1), case
        assert (out - ref_out).abs().max() <= TOL, case
        for name, grad, ref in zip("qkv", grads, ref_grads):
            assert (grad - ref).abs().max() <= TOL, f"{case}: d{name}"


def _worker(out_dir):
    """One CP rank: attention on this rank's share of each case, saved for the test to reassemble."""
    from megatron.core import parallel_state

    from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1, 2)
    cp_rank = parallel_state.get_context_parallel_rank()
    module = attention_module(context_parallel_size=2)
    for case, lengths in CASES.items():
        packed, source, seq_length = packed_case(lengths, cp=2, rank=cp_rank)
        q, k, v, grad_out = random_qkv_and_grad(seq_length, seed=len(lengths))
        # Padding positions get random q/k/v of their own (they must not matter) and no upstream gradient.
        pad = source < 0
        gen = torch.Generator().manual_seed(100 + cp_rank)
        local = [torch.randn(source.numel(), *t.shape[1:], generator=gen) for t in (q, k, v)]
        for full, part in zip((q, k, v), local):
            part[~pad] = full[source[~pad]]
        local_grad_out = torch.zeros(source.numel(), *grad_out.shape[1:])
        local_grad_out[~pad] = grad_out[source[~pad]]
        out, grads = run_attention(module, *local, local_grad_out, packed.packed_seq_params)
        torch.save(
            {"seq_length": seq_length, "source": source, "out": out, "grads": grads,
             "cu_seqlens": packed.packed_seq_params.cu_seqlens_q},
            Path(out_dir) / f"{case}_rank{cp_rank}.pt",
        )
    destroy_model_parallel()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: torchrun --nproc-per-node=2 tests/test_attention.py --worker OUT_DIR (run by pytest)")
