"""Data-flow-space merging: paths of layers from several models (fusellm/merge/dfs.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fusellm.merge.dfs import (
    DfsGenome,
    PathModel,
    Step,
    check_composable,
    path_config,
    path_state_dict,
)

CFG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=120,
)


def llama(seed: int, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CFG, "num_hidden_layers": layers})).eval()


@pytest.fixture(scope="module")
def sources():
    return {"a": llama(1), "b": llama(2, layers=4)}


IDS = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 8:] = 0


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def test_one_sources_layers_in_order_reproduce_it(sources):
    g = DfsGenome({"a": 3, "b": 4}, repeats=2, scales="pairs", embeddings_from="a")
    x0, (lo, hi) = g.x0_bounds()
    assert g.dim == 2 * 7 + 2 and len(x0) == len(lo) == len(hi) == g.dim
    steps = g.decode(x0)  # the search starts at the embeddings source itself
    assert steps == [Step("a", 0), Step("a", 1), Step("a", 2)]
    pm = PathModel(sources, "a")
    assert torch.equal(logits(pm.build(steps)), logits(sources["a"]))


def test_a_path_mixing_two_sources_equals_a_hand_built_stack(sources):
    """Layers b1, a0, b3, a2 (scales 1) = a model with those layers stacked by hand."""
    steps = [Step("b", 1), Step("a", 0), Step("b", 3), Step("a", 2)]
    got = logits(PathModel(sources, "a").build(steps))
    hand = llama(1, layers=4)
    hand.load_state_dict(sources["a"].state_dict(), strict=False)  # embeddings, norm, head
    for p, s in enumerate(steps):
        hand.model.layers[p].load_state_dict(sources[s.model].model.layers[s.layer].state_dict())
    assert torch.allclose(got, logits(hand), atol=1e-6, rtol=0)


def test_genome_decodes_indicators_and_transition_scales():
    g = DfsGenome({"a": 2, "b": 2}, repeats=1, scales="pairs", embeddings_from="a")
    # slots a0 a1 b0 b1; scales (a->b), (b->a)
    steps = g.decode([0.3, -0.1, 0.9, 0.2, 1.5, 0.7])
    assert steps == [Step("a", 0), Step("b", 0, 1.5), Step("b", 1)]
    g = DfsGenome({"a": 2, "b": 2}, repeats=2, scales="layers", embeddings_from="b")
    x = [-1, 1, 1, -1, 1, -1, -1, 1] + [0.6, 0.7, 0.8, 0.9]
    assert g.decode(x) == [
        Step("a", 1, 0.7),
        Step("b", 0, 0.8),
        Step("a", 0, 0.6),
        Step("b", 1, 0.9),
    ]
    assert DfsGenome({"a": 2}, 1, "none", "a").decode([1, 1]) == [Step("a", 0), Step("a", 1)]


def test_saved_path_reloads_and_scores_as_the_candidate(sources, tmp_path):
    """Scales folded into o_proj/down_proj: the saved ordinary Llama directory gives the
    candidate's logits (to RMSNorm epsilon), loaded with AutoModelForCausalLM."""
    steps = [Step("a", 0), Step("b", 2, 1.7), Step("b", 3), Step("a", 1, 0.6), Step("a", 2)]
    want = logits(PathModel(sources, "a").build(steps))
    cfg = path_config(sources["a"].config, steps, {n: m.config for n, m in sources.items()})
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(path_state_dict(sources, "a", steps, fold=True))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.num_hidden_layers == 5
    assert torch.allclose(logits(again), want, atol=1e-4, rtol=1e-4)
    # unfolded, the same weights are another model: the fold is what makes it equal
    plain = AutoModelForCausalLM.from_config(cfg).eval()
    plain.load_state_dict(path_state_dict(sources, "a", steps, fold=False))
    assert not torch.allclose(logits(plain), want, atol=1e-2)


def test_sources_of_another_architecture_are_refused(sources):
    other = copy.deepcopy(sources["a"].config.to_dict())
    other["num_key_value_heads"] = 4
    with pytest.raises(ValueError, match="differ in config.num_key_value_heads"):
        check_composable({"a": sources["a"].config.to_dict(), "c": other})
    check_composable({n: m.config.to_dict() for n, m in sources.items()})  # layer counts may differ
    ran = {**sources["a"].config.to_dict(), "use_cache": False}  # how it runs: not a difference
    check_composable({"a": sources["a"].config.to_dict(), "c": ran})
