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
