"""Every merge method of mergekit's registry: accepted by the schema with its own
parameters (checked by name), run by the merge stage on tiny models, and equal to what
mergekit itself makes from the ``mergekit.yaml`` the stage writes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from pydantic import ValidationError  # noqa: E402

from fusellm.merge import methods  # noqa: E402
from fusellm.merge.config import MergeSpec  # noqa: E402

# method -> (base?, per-model parameters of each merged model, merge-wide parameters).
# Models: a, b, c are perturbations of base (c only where a method needs three inputs).
W = {"weight": 0.6}
EXAMPLES = {
    "linear": (False, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "task_arithmetic": (True, [W, {"weight": 0.4}], {"lambda": 0.8}),
    "ties": (True, [{**W, "density": 0.5}, {"weight": 0.4, "density": 0.7}], {}),
    "dare_ties": (True, [{**W, "density": 0.5}, {"weight": 0.4, "density": 0.7}], {}),
    "dare_linear": (True, [{**W, "density": 0.5}, {"weight": 0.4, "density": 0.7}], {}),
    "breadcrumbs": (True, [{**W, "density": 0.8, "gamma": 0.05}, W], {}),
    "breadcrumbs_ties": (True, [{**W, "density": 0.8, "gamma": 0.05}, W], {}),
    "della": (True, [{**W, "density": 0.5, "epsilon": 0.1}, W], {}),
    "della_linear": (True, [{**W, "density": 0.5, "epsilon": 0.1}, W], {}),
    "sce": (True, [{}, {}], {"select_topk": 0.5}),
    "slerp": (True, [{}], {"t": 0.3}),
    "nuslerp": (True, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "multislerp": (False, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "karcher": (False, [{}, {}], {"max_iter": 5}),
    "model_stock": (True, [{}, {}], {}),
    "nearswap": (True, [{}], {"t": 0.01}),
    "arcee_fusion": (True, [{}], {}),
    "ram": (True, [{}, {}], {}),
    "ramplus_tl": (True, [{}, {}], {"r": 0.2}),
    "passthrough": (False, [{"scale": 0.5}], {}),
}
# Random drops: mergekit-yaml draws its own masks, so only the seeded in-memory merge is
# reproducible (tested in test_merge.py); these are compared for shape and sanity only.
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def test_every_registered_method_has_an_example():
    assert set(EXAMPLES) == set(methods.registry()), "a mergekit method without a test"


def _spec(method: str, **changes) -> dict:
    has_base, per_model, shared = EXAMPLES[method]
    doc = {
        "method": method,
        "models": [{"model": m, **p} for m, p in zip("abc", per_model, strict=False)],
        "parameters": dict(shared),
        **({"base": "base"} if has_base else {}),
    }
    doc.update(changes)
    return doc


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_models):
    """A tiny Llama (the base) and three perturbations of it, saved as HF directories."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("family")
    src = tiny_models["llama_bpe"]
    tok = AutoTokenizer.from_pretrained(src)
    out = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        m = AutoModelForCausalLM.from_pretrained(src)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * i * torch.randn_like(p))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _recipe(tmp_path, family, name: str, spec: dict):
    import yaml

    from fusellm.recipe import load_recipe

    doc = {
        "name": "methods",
        "run_dir": str(tmp_path / "run"),
        "models": {n: {"path": str(p)} for n, p in family.items()},
        "target": "base",
        "sources": ["a"],
        "merge": {name: spec},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_recipe(path)


def _mergekit_itself(yaml_path, out):
    """What ``mergekit-yaml`` makes of the written config (mergekit's own loader)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml_path.read_text()))
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False))
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_method_runs_through_the_merge_stage_as_mergekit_would(method, tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fusellm.merge.runner import run

    recipe = _recipe(tmp_path, family, method, _spec(method))
    run(recipe)
    out = tmp_path / "run" / "merge" / method
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.arange(12).view(1, -1)
    assert torch.isfinite(model(ids).logits).all()
    ours = load_file(out / "model" / "model.safetensors")
    inputs = [load_file(p / "model.safetensors") for p in family.values()]
    moved = [k for k in ours if not any(torch.equal(ours[k], sd[k]) for sd in inputs)]
    if method != "passthrough":  # a merge makes new weights, not a copy of one input
        assert moved, f"{method}: every tensor equals one of the inputs'"
    if method in RANDOM:  # seeded: the same merge again, another seed draws other masks
        run(_recipe(tmp_path, family, method, _spec(method)), force=True)
        again = load_file(out / "model" / "model.safetensors")
        assert all(torch.equal(ours[k], again[k]) for k in ours)
        run(_recipe(tmp_path, family, method, _spec(method, seed=1)), force=True)
        other = load_file(out / "model" / "model.safetensors")
        assert any(not torch.equal(ours[k], other[k]) for k in ours)
        return
    theirs = _mergekit_itself(out / "mergekit.yaml", tmp_path / "mergekit-out")
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k].to(v.dtype), atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize(
    "method, change, error",
    [
        ("slerp", {"parameters": {}}, r"parameters: method 'slerp' needs \['t'\]"),
        ("slerp", {"parameters": {"t": 0.3, "tt": 1}}, r"parameters.tt: .* has no merge-wide"),
        ("slerp", {"parameters": {"t": "half"}}, r"parameters.t: 'half' is not a valid"),
        ("slerp", {"base": None}, r"base: method 'slerp' needs a base model"),
        ("ties", {"parameters": {"density": 0.5}}, r"per-model parameter: set it on each"),
        ("linear", {"base": "base"}, r"base: method 'linear' takes no base model"),
        ("model_stock", {"models": [{"model": "a"}]}, r"merges at least 3 models"),
        ("nuslerp", {"models": [{"model": "a", "weight": 1.0}]}, r"exactly 2 models"),
        ("sce", {"models": [{"model": "a", "weight": 1.0}]}, r"models.0.weight: .*'sce' has no"),
        ("della", {"models": [{"model": "a", "epsilon": [0.1, 0.2]}]}, r"2 values for layer_"),
        ("ties", {"models": [{"model": "a", "density": 1.5}]}, r"models.0.density: must be in"),
        ("karcher", {"parameters": {"max_iter": True}}, r"parameters.max_iter: True is a boolean"),
        ("nonesuch", {}, r"'nonesuch' is not a mergekit merge method"),
    ],
)
def test_parameters_are_checked_by_name_at_load(method, change, error):
    spec = _spec(method if method in EXAMPLES else "linear", **change)
    spec["method"] = method
    with pytest.raises(ValidationError, match=error):
        MergeSpec.model_validate(spec)


def test_every_example_is_accepted_with_list_values_per_layer_group():
    for method in EXAMPLES:
        MergeSpec.model_validate(_spec(method))
    spec = MergeSpec.model_validate(
        _spec("slerp", parameters={"t": [0.0, 1.0]}, layer_groups=2), strict=True
    )
    assert spec.parameters == {"t": [0.0, 1.0]}
    # a model given no weight gets 1 where the method has one
    assert MergeSpec.model_validate(_spec("ties", models=[{"model": "a"}])).inputs() == [
        ("a", {"weight": 1.0})
    ]
