"""Recipes: YAML -> overrides -> ``${...}`` interpolation -> one typed config per stage.

A recipe is data, not code. Loading goes through four steps, each of which can fail with
a :class:`RecipeError` that names the recipe file and the dotted key path:

1. ``yaml`` with a safe loader (no ``!!python/...`` tags, duplicate keys refused, and
   YAML-1.2 floats so ``lr: 1e-5`` is a float and not the string ``"1e-5"``); a recipe
   with ``extends: base.yaml`` is that recipe with its own keys merged on top;
2. dotted ``key=value`` overrides from the command line (values parsed as YAML scalars);
3. ``${a.b.c}`` references into the recipe, ``${env:NAME}`` environment variables and
   ``${recipe_dir}`` (the recipe file's directory)
   (overrides are applied first, so ``run_dir=/scratch/x`` moves every path that
   refers to ``${run_dir}``);
4. validation into :class:`Recipe` (pydantic, strict types, unknown keys forbidden).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)

from fusellm.stages import load_attr, sections


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file and key path."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and wrong types fail at load time."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelSpec(StrictModel):
    """Where a model and its tokenizer come from (see :mod:`fusellm.models`).

    ``path`` is one of: a local HF directory; a hub id (``org/name``); a ``.gguf`` file;
    ``pkg:MODULE/relative/file`` for a file shipped inside an installed Python package
    (found without importing the package); or ``gguf-parts:MODULE`` for a package that
    ships a GGUF file in parts and exposes ``assemble(output_path)``.
    """

    path: str
    gguf_file: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer location when it differs from path")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template file, for a model whose tokenizer has none "
        "(or to replace its own); used where a conversation is rendered for the model",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"no such file: {v}")
        return v


class TrackingConfig(StrictModel):
    """Weights & Biases tracking. ``mode: auto`` is online with an API key, else offline."""

    backend: Literal["wandb", "none"] = "wandb"
    project: str = "fusellm"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = Field(default_factory=list)


class RecipeBase(StrictModel):
    """The fields every stage shares. :class:`Recipe` adds one field per stage section
    (``corpus``, ``extract``, ... as the stage table names them), each validated into the
    type the table gives for it (:func:`validate_tree`), or None when the recipe has none."""

    name: str
    run_dir: str
    seed: int = 0
    models: dict[str, ModelSpec]
    target: str
    sources: list[str] = Field(min_length=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # stage -> directory, where a stage runs elsewhere than run_dir/STAGE (the fuse and
    # train stages of one pairwise fusion: run_dir/pairwise/SOURCE/{fuse,train})
    _dirs: dict[str, Path] = PrivateAttr(default_factory=dict)

    @property
    def all_models(self) -> list[str]:
        """Target first, then the sources (the target is usually also a source)."""
        return [self.target] + [s for s in self.sources if s != self.target]

    def stage_dir(self, stage: str) -> Path:
        return self._dirs.get(stage, Path(self.run_dir) / stage)


Recipe = create_model(
    "Recipe",
    __base__=RecipeBase,
    __doc__="A whole fusion job. Every stage reads its own section plus the shared fields.",
    **{name: (Any, None) for name in sections()},
)


def _unknown_names(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, problem) for each model name the recipe uses that ``models:`` lacks."""
    known = sorted(recipe.models)
    out = []
    if recipe.target not in recipe.models:
        out.append(("target", f"'{recipe.target}' is not one of models {known}"))
    for i, s in enumerate(recipe.sources):
        if s not in recipe.models:
            out.append((f"sources.{i}", f"'{s}' is not one of models {known}"))
    if len(set(recipe.sources)) != len(recipe.sources):
        out.append(("sources", f"duplicate names in {recipe.sources}"))
    lists = {
        "corpus.fit_models": recipe.corpus.fit_models if recipe.corpus else None,
        "extract.models": recipe.extract.models if recipe.extract else None,
        "fuse.sources": recipe.fuse.sources if recipe.fuse else None,
        "pairwise.sources": recipe.pairwise.sources if recipe.pairwise else None,
    }
    for key, names in lists.items():
        for i, m in enumerate(names or []):
            if m not in recipe.models:
                out.append((f"{key}.{i}", f"'{m}' is not one of models {known}"))
    return out


# ---------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with duplicate-key detection and YAML 1.2 float syntax."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# PyYAML implements YAML 1.1, where "1e-5" (no dot) is a string. Learning rates are
# written that way in every recipe, so accept the YAML 1.2 float forms.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: invalid recipe YAML: {problem}") from None


# ---------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are YAML scalars/lists."""
    if "=" not in item:
        raise RecipeError(f"override '{item}': expected key=value (e.g. train.lr=1e-5)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override '{item}': empty key segment in '{key}'")
    return parts, parse_yaml(raw, f"override {key}") if raw != "" else ""


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, p, parts[: i + 1])]
            continue
        if p not in node or node[p] is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, (dict, list)):
            raise RecipeError(
                f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a mapping"
            )
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list, p: str, path: list[str]) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise RecipeError(
            f"override {'.'.join(path)}: '{p}' is not an index of a list of {len(node)}"
        )
    return int(p)


# ------------------------------------------------------------------ interpolation

_REF = re.compile(r"\$\{([^}]+)\}")


def interpolate(tree: Any, builtins: Mapping[str, str] | None = None) -> Any:
    """Resolve ``${a.b}`` (recipe keys) and ``${env:NAME}`` in every string of ``tree``.

    A string that is exactly one reference takes the referenced value with its type
    (so ``sources: ${models_list}`` can be a list); references inside longer strings are
    formatted with ``str``. Cycles and missing keys raise :class:`RecipeError`.
    """
    root = tree
    builtins = builtins or {}

    def lookup(ref: str, stack: tuple[str, ...]) -> Any:
        if ref in builtins:
            return builtins[ref]
        if ref.startswith("env:"):
            name = ref[4:]
            if name in _SECRET_ENV:
                # A recipe value is written to manifests, fingerprints, checkpoints (the
                # Trainer pickles its arguments) and W&B configs; fusellm and the
                # libraries read these from the environment themselves.
                raise RecipeError(
                    f"${{{ref}}}: secrets may not be interpolated into the recipe (it is "
                    "recorded in manifests, checkpoints and W&B); it is read from the "
                    "environment where needed"
                )
            if name not in os.environ:
                raise RecipeError(f"${{{ref}}}: environment variable {name} is not set")
            return os.environ[name]
        if ref in stack:
            raise RecipeError(f"${{{ref}}}: circular reference {' -> '.join(stack + (ref,))}")
        node: Any = root
        for part in ref.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise RecipeError(f"${{{ref}}}: no such key in the recipe")
        return resolve(node, stack + (ref,))

    def resolve(node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, str):
            m = _REF.fullmatch(node)
            if m:
                return lookup(m.group(1).strip(), stack)
            return _REF.sub(lambda mm: str(lookup(mm.group(1).strip(), stack)), node)
        if isinstance(node, Mapping):
            return {k: resolve(v, stack) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, stack) for v in node]
        return node

    return resolve(tree, ())


# -------------------------------------------------------------------------- load


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override, interpolate and validate a recipe file.

    Raises :class:`RecipeError` naming the file and the dotted key of the first problems.
    """
    path = Path(path)
    tree = read_tree(path)
    overridden: set[str] = set()
    for item in overrides:
        parts, value = parse_override(item)
        apply_override(tree, parts, value)
        overridden.add(".".join(parts))
    try:
        tree = interpolate(tree, {"recipe_dir": str(path.resolve().parent)})
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    return validate_tree(tree, str(path), overridden)


def read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe file's YAML mapping, with ``extends: other.yaml`` (relative to the file)
    resolved: the other recipe's tree, deep-merged with this one's keys on top (mappings
    merge key by key; any other value, lists included, replaces)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: recipe is not UTF-8 ({e.reason} at byte {e.start})") from None
    tree = parse_yaml(text, str(path))
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise RecipeError(f"{path}: extends: expected a recipe file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        chain = " -> ".join(str(p) for p in (*seen, path.resolve(), base_path))
        raise RecipeError(f"{path}: extends: recipes extend each other in a cycle: {chain}")
    return _deep_merge(read_tree(base_path, (*seen, path.resolve())), tree)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def validate_tree(tree: dict, source: str, overridden: set[str] = frozenset()) -> Recipe:
    """The recipe tree as a :class:`Recipe`: shared fields first, then each stage section
    through the type the stage table names, then the model names it uses. Every problem
    found is reported at once, each under its dotted key."""
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_format_errors(e.errors(), source, overridden)) from None
    errors = []
    for name, ref in sections().items():
        value = getattr(recipe, name)
        if value is None:
            continue
        check = load_attr(ref)  # a config type, or a function that validates the section
        try:
            if inspect.isfunction(check):
                setattr(recipe, name, check(value))
            else:
                setattr(recipe, name, TypeAdapter(check).validate_python(value, strict=True))
        except ValidationError as e:
            errors += [{**err, "loc": (name, *err["loc"])} for err in e.errors()]
    if not errors:
        errors = [
            {"loc": tuple(key.split(".")), "msg": msg, "type": "value_error"}
            for key, msg in _unknown_names(recipe)
        ]
    if errors:
        raise RecipeError(_format_errors(errors, source, overridden))
    return recipe


def _format_errors(errors: list[dict], source: str, overridden: set[str]) -> str:
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        origin = " (set by a command-line override)" if loc in overridden else ""
        got = "" if err["type"] in ("missing", "value_error") else f" (got {err['input']!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{got}{origin}")
    return f"{source}: invalid recipe:\n" + "\n".join(lines)


# ------------------------------------------------------------------ fingerprints

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.I)
_SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with secret-looking keys and known secret env values replaced.

    Used before anything is written to a manifest, a config dump or W&B.
    """
    secrets = [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]

    def walk(x: Any, key: str = "") -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str):
            if key and _SECRET_KEY.search(key) and not key.endswith(("_tokens", "tokenizer")):
                return "<redacted>"
            for s in secrets:
                x = x.replace(s, "<redacted>")
        return x

    return walk(obj)


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): the identity of a config."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
