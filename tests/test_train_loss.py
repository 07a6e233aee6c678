"""The sparse fusion loss: equals the dense reference at k = V; λ = 1 is exactly CLM."""

from __future__ import annotations

import pytest
import torch

from fusellm.train.loss import fusion_loss_sums

B, T, V = 2, 7, 23


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -2:] = -100
    mask = torch.rand(B, T, generator=g) < 0.8
    return logits, teacher, labels, mask


def dense_reference(logits, teacher, labels, mask, lam, tau=1.0, kind="ce"):
    logq = torch.log_softmax(logits, -1)
    valid = labels != -100
    clm = -(logq.gather(-1, labels.clamp(min=0)[..., None])[..., 0])
    p = torch.softmax(teacher / tau, -1)
    ce = -(p * logq).sum(-1)
    if kind == "kl":
        ce = ce + (p * torch.log(p)).sum(-1)
    fus = torch.where(mask, ce, clm)
    return (lam * clm[valid].sum() + (1 - lam) * fus[valid].sum()) / valid.sum()


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sparse_equals_dense_when_k_is_v(kind, tau):
    logits, teacher, labels, mask = setup()
    ids = torch.arange(V).expand(B, T, V)
    s = fusion_loss_sums(logits, labels, ids, teacher, mask, 0.3, tau, "renormalize", kind)
    ref = dense_reference(logits, teacher, labels, mask, 0.3, tau, kind)
    assert torch.allclose(s.total / s.n_clm, ref.float(), atol=1e-6, rtol=1e-6)


def test_tail_bucket_equals_dense_with_merged_tail():
    logits, teacher, labels, mask = setup(1)
    k = 5
    vals, ids = teacher.topk(k, -1)
    s = fusion_loss_sums(logits, labels, ids, vals, mask, 0.0, 1.0, "bucket", "ce")
    logq = torch.log_softmax(logits, -1)
    p, q = vals.exp(), logq.gather(-1, ids).exp()
    ce = -(p * q.log()).sum(-1) - (1 - p.sum(-1)) * torch.log(1 - q.sum(-1))
    clm = -(logq.gather(-1, labels.clamp(min=0)[..., None])[..., 0])
    valid = labels != -100
    ref = torch.where(mask, ce, clm)[valid].sum()
    assert torch.allclose(s.total, ref.float(), atol=1e-5)


def test_lambda_one_is_exactly_the_model_clm_loss(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"])
    ids = torch.randint(3, 250, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    out = model(input_ids=ids)
    k = 4
    f_ids = torch.randint(0, 320, (2, 12, k))
    f_lp = torch.log_softmax(torch.randn(2, 12, k), -1)
    s = fusion_loss_sums(
        out.logits, labels, f_ids, f_lp, torch.ones(2, 12, dtype=torch.bool), lm_weight=1.0
    )
    ref = model(input_ids=ids, labels=ids).loss
    assert torch.equal(s.clm, s.total) and torch.allclose(s.total / s.n_clm, ref, atol=1e-6, rtol=0)


def test_padding_entries_and_empty_rows_are_harmless():
    logits, teacher, labels, mask = setup(2)
    vals, ids = teacher.topk(4, -1)
    vals[..., 2:] = -torch.inf  # rows with only 2 live entries
    vals[1, 3] = -torch.inf  # a row with none
    s = fusion_loss_sums(logits, labels, ids, vals, mask, 0.5)
    assert torch.isfinite(s.total)
    g = torch.autograd.grad(
        fusion_loss_sums(logits.requires_grad_(), labels, ids, vals, mask, 0.5).total, logits
    )[0]
    assert torch.isfinite(g).all()


def test_gather_log_softmax_gradient():
    from fusellm.train.loss import GatherLogSoftmax

    x = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (3, 4, 5))  # repeated ids included
    assert torch.autograd.gradcheck(lambda x: GatherLogSoftmax.apply(x, idx), (x,))
    ref = torch.log_softmax(x, -1).gather(-1, idx)
    assert torch.allclose(GatherLogSoftmax.apply(x, idx), ref)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_loss_equals_the_loss_of_full_logits(chunk, tail, softcap):
    """The same sums and the same gradients for the hidden states and the head weight,
    whatever the chunk size; padding, unaligned rows and a soft-capped head included."""
    from fusellm.heads import OutputHead
    from fusellm.train.loss import chunked_fusion_loss_sums

    g = torch.Generator().manual_seed(3)
    H = 6
    proj = torch.nn.Linear(H, V, bias=False).double()
    head = OutputHead(proj, 1.0, softcap)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    _, teacher, labels, mask = setup(4)
    vals, ids = teacher.topk(5, -1)
    vals[0, 1, 3:] = -torch.inf
    kw = dict(lm_weight=0.3, tail=tail, kind="kl" if softcap else "ce")

    full = fusion_loss_sums(head(hidden), labels, ids, vals, mask, **kw)
    want = torch.autograd.grad(full.total, [hidden, proj.weight])
    part = chunked_fusion_loss_sums(hidden, head, labels, ids, vals, mask, chunk, **kw)
    got = torch.autograd.grad(part.total, [hidden, proj.weight])
    for a, b in [(part.total, full.total), (part.clm, full.clm), (part.fusion, full.fusion)]:
        assert torch.allclose(a, b, rtol=1e-6), (a, b)  # the loss is reduced in fp32
    assert part.n_clm == full.n_clm and part.n_fusion == full.n_fusion
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """Every tensor of the vocabulary's width that the chunked loss creates, forward and
    backward, has at most `chunk` rows (the unchunked loss: all B·T of them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusellm.heads import OutputHead
    from fusellm.train.loss import chunked_fusion_loss_sums

    Vb, H, chunk = 997, 2, 5  # H < chunk: the head weight's [H, V] view counts H rows

    class Widest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == Vb:
                    self.rows = max(self.rows, t.numel() // Vb)
            return out

    proj = torch.nn.Linear(H, Vb, bias=False)
    hidden = torch.randn(3, 20, H, requires_grad=True)
    labels = torch.randint(0, Vb, (3, 20))
    ids = torch.randint(0, Vb, (3, 20, 4))
    lps = torch.log_softmax(torch.randn(3, 20, 4), -1)
    mask = torch.ones(3, 20, dtype=torch.bool)
    head = OutputHead(proj)
    with Widest() as chunked:
        chunked_fusion_loss_sums(hidden, head, labels, ids, lps, mask, chunk).total.backward()
    with Widest() as full:
        fusion_loss_sums(head(hidden), labels, ids, lps, mask).total.backward()
    assert chunked.rows == chunk and full.rows == 3 * 20


def test_head_chunks_are_chosen_by_vocabulary_size():
    from fusellm.train.trainer import head_chunk_tokens

    assert head_chunk_tokens(-1, 32_000) == 0  # Llama-2: the faster unchunked loss
    assert head_chunk_tokens(-1, 262_144) * 262_144 * 4 <= 1 << 27  # Gemma: 128 MiB chunks
    assert head_chunk_tokens(-1, 151_936) > 0
    assert head_chunk_tokens(0, 262_144) == 0 and head_chunk_tokens(7, 100) == 7
