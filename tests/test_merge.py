"""merge core: each method equals its formula on random tensors; self-merge is identity."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from fusellm.merge.core import MergeRefused, check_compatible, group_of, merge  # noqa: E402


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (11, 4),
        "model.layers.0.w": (6, 5),
        "model.layers.1.w": (6, 5),
        "model.norm.weight": (4,),
    }
    return {f"m{i}": {k: torch.randn(s, generator=g) for k, s in shapes.items()} for i in range(n)}


def _w(densities=None, **weights):
    """Per-model parameters: {model: {"weight": w[, "density": d]}}."""
    return {
        m: {"weight": w, **({"density": densities[m]} if densities else {})}
        for m, w in weights.items()
    }


def test_linear_is_the_normalised_weighted_mean():
    s = _states(2)
    out = merge(s, "linear", _w(m0=0.3, m1=0.9))
    for k in s["m0"]:
        torch.testing.assert_close(out[k], (0.3 * s["m0"][k] + 0.9 * s["m1"][k]) / 1.2)


def test_task_arithmetic_adds_weighted_task_vectors():
    s = _states(3)
    out = merge(s, "task_arithmetic", _w(m1=0.5, m2=-0.25), base="m0", shared={"lambda": 0.8})
    for k in s["m0"]:
        d1, d2 = s["m1"][k] - s["m0"][k], s["m2"][k] - s["m0"][k]
        torch.testing.assert_close(out[k], s["m0"][k] + 0.8 * (0.5 * d1 - 0.25 * d2))


def _ties_direct(base, models, w, density):
    deltas = []
    for m in models:
        d = m - base
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().topk(k).indices] = True
        deltas.append(torch.where(keep.view_as(d), d, 0.0))
    wd = torch.stack([wi * d for wi, d in zip(w, deltas, strict=True)])
    sign = torch.sign(wd.sum(0))
    agree = torch.sign(torch.stack(deltas)) == sign
    num = (wd * agree).sum(0)
    den = (torch.tensor(w).view(-1, *[1] * base.dim()) * agree).sum(0)
    return base + torch.where(den.abs() > 0, num / den.where(den.abs() > 0, 1.0), 0.0)


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    s = _states(3, seed=3)
    out = merge(s, "ties", _w({"m1": 0.5, "m2": 0.5}, m1=0.6, m2=0.4), base="m0")
    for k in s["m0"]:
        exp = _ties_direct(s["m0"][k], [s["m1"][k], s["m2"][k]], [0.6, 0.4], 0.5)
        torch.testing.assert_close(out[k], exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_at_random_and_rescales_the_rest(method):
    s = _states(2, seed=5)
    big = {k: v.repeat(20, *[1] * (v.dim() - 1)) for k, v in s["m0"].items()}
    big1 = {k: v.repeat(20, *[1] * (v.dim() - 1)) for k, v in s["m1"].items()}
    st = {"m0": big, "m1": big1}
    out = merge(st, method, _w({"m1": 0.3}, m1=1.0), base="m0", seed=7)
    kept = total = 0
    for k in big:
        d = big1[k] - big[k]
        got = out[k] - big[k]
        mask = got.abs() > 1e-7
        # kept entries are δ rescaled so that the task vector keeps its L1 norm (mergekit's
        # DARE rescale; in expectation 1 / density); dropped entries are 0
        scale = d.abs().sum() / (d * mask).abs().sum()
        torch.testing.assert_close(got, d * mask * scale, atol=1e-5, rtol=1e-4)
        assert abs(float(scale) - 1 / 0.3) < 1.0
        kept, total = kept + int(mask.sum()), total + d.numel()
    assert abs(kept / total - 0.3) < 0.05
    again = merge(st, method, _w({"m1": 0.3}, m1=1.0), base="m0", seed=7)
    assert all(torch.equal(out[k], again[k]) for k in out)  # seeded: reproducible


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]
)
def test_merging_a_model_with_itself_returns_it(method):
    s = _states(1)
    a = s["m0"]
    states = {"a": a, "b": {k: v.clone() for k, v in a.items()}}
    if method == "linear":
        out = merge(states, method, _w(a=0.5, b=0.5))
    else:
        dens = {"b": 0.5} if method != "task_arithmetic" else None
        out = merge(states, method, _w(dens, b=1.0), base="a")
    for k in a:
        torch.testing.assert_close(out[k], a[k])


def test_layer_groups_get_their_own_weights():
    s = _states(2)
    out = merge(s, "linear", _w(m0=[1.0, 0.0], m1=[0.0, 1.0]), layer_groups=2, num_layers=2)
    torch.testing.assert_close(out["model.layers.0.w"], s["m0"]["model.layers.0.w"])
    torch.testing.assert_close(out["model.layers.1.w"], s["m1"]["model.layers.1.w"])
    torch.testing.assert_close(
        out["model.embed_tokens.weight"], s["m0"]["model.embed_tokens.weight"]
    )
    torch.testing.assert_close(out["model.norm.weight"], s["m1"]["model.norm.weight"])
    assert [group_of(f"model.layers.{i}.x", 8, 4) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_incompatible_models_are_refused_with_a_pointer_to_fusion():
    from types import SimpleNamespace as NS

    cfg = {"a": NS(model_type="llama"), "b": NS(model_type="gpt2")}
    with pytest.raises(MergeRefused, match="gpt2.*fusion"):
        check_compatible(cfg, {"a": "t", "b": "t"}, {"a": {}, "b": {}})
    cfg["b"] = NS(model_type="llama")
    with pytest.raises(MergeRefused, match="different tokenizers"):
        check_compatible(cfg, {"a": "t", "b": "u"}, {"a": {}, "b": {}})
    with pytest.raises(MergeRefused, match="shape"):
        check_compatible(cfg, {"a": "t", "b": "t"}, {"a": {"w": (2, 3)}, "b": {"w": (3, 3)}})


def test_tied_weights_are_merged_once_with_the_embeddings_group():
    s = _states(2)
    for sd in s.values():  # lm_head tied to the embeddings: one tensor under two keys
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    out = merge(s, "linear", _w(m0=[1.0, 0.0], m1=[0.0, 1.0]), layer_groups=2, num_layers=2)
    torch.testing.assert_close(out["lm_head.weight"], s["m0"]["model.embed_tokens.weight"])
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


def test_merge_configs_that_mergekit_would_reject_late_fail_at_load():
    from pydantic import ValidationError

    from fusellm.merge.config import MergeSpec

    with pytest.raises(ValidationError, match="parameters.lambda: method 'linear' has no"):
        MergeSpec.model_validate(
            {"method": "linear", "parameters": {"lambda": 0.5}, "models": [{"model": "a"}]}
        )
    with pytest.raises(ValidationError, match="sum to 0"):
        MergeSpec.model_validate(
            {
                "method": "linear",
                "models": [{"model": "a", "weight": 1.0}, {"model": "b", "weight": -1.0}],
            }
        )
