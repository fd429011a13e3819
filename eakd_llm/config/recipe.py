"""Recipe YAML + command-line overrides -> a validated :class:`EAKDConfig`, with errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from .eakd_config import ConfigError, EAKDConfig

_MISSING = object()


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 scalars: only true/false are booleans (``eval_strategy: no`` stays the
    string "no", not False) and exponents need no dot (``1e-5`` is a float, not a string)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load(text_or_stream):
    return yaml.load(text_or_stream, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(EAKDConfig) if f.init}


def _field_types() -> dict[str, Any]:
    try:
        return typing.get_type_hints(EAKDConfig)
    except Exception:  # some TrainingArguments annotations may not resolve on every transformers version
        return {name: f.type for name, f in config_fields().items()}


def read_yaml(path: str) -> dict[str, Any]:
    """Safe YAML 1.2 load of a recipe; syntax errors name the line, and the top level must be a mapping."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = _load(handle)
    except FileNotFoundError as err:
        raise ConfigError(f"recipe {path!r} does not exist") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} at line {context_mark.line + 1})"
        raise ConfigError(f"recipe {path!r} is not valid YAML{where}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping of key: value, got {type(data).__name__}")
    return data


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value``, ``--key=value`` and bare ``--flag`` (true) into a dict; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected --key value after the recipe, got {token!r}")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        try:
            overrides[key] = _load(value) if value != "" else ""
        except yaml.YAMLError:
            overrides[key] = value
        i += 1
    return overrides


def check_keys(keys: Sequence[str], source: str) -> None:
    """Unknown keys are errors, with the closest known key suggested."""
    known = config_fields()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known.keys(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type annotation, converting where it is lossless; else ConfigError."""
    result = _coerce(value, annotation)
    if result is _MISSING:
        raise ConfigError(f"{key} expects {_type_name(annotation)}, got {value!r} ({type(value).__name__})")
    return result


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation is Any or annotation is typing.Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            return None if type(None) in options else _MISSING
        # An exact match wins (so "none" stays a str for str | list[str]); then lossless conversions.
        if any(type(value) is option for option in options):
            return value
        for option in options:
            result = _coerce(value, option)
            if result is not _MISSING:
                return result
        return _MISSING
    if annotation is type(None):
        return None if value is None else _MISSING
    if origin in (list, Sequence, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        # "q_proj,v_proj" on the command line means a list of two names
        items = value if isinstance(value, (list, tuple)) else (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else _MISSING
        )
        if items is _MISSING:
            return _MISSING
        if not args:
            return list(items)
        out = [_coerce(item, args[0]) for item in items]
        return _MISSING if any(o is _MISSING for o in out) else out
    if origin is dict or annotation is dict:
        return value if isinstance(value, dict) else _MISSING
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return _MISSING
    if annotation is int:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _MISSING
    if annotation is float:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return float(value) if isinstance(value, (int, float)) else _MISSING
    if annotation is str:
        return value if isinstance(value, str) else _MISSING
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            return _MISSING
    return value  # an annotation we do not check: let TrainingArguments validate it


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def build_config(values: dict[str, Any], source: str = "recipe") -> EAKDConfig:
    """A validated :class:`EAKDConfig` from raw key/values; every problem is a :class:`ConfigError`."""
    check_keys(list(values), source)
    types_by_name = _field_types()
    kwargs = {key: coerce(key, value, types_by_name.get(key, Any)) for key, value in values.items()}
    if "output_dir" not in kwargs:
        raise ConfigError("output_dir is required: the folder for checkpoints and the final model")
    try:
        return EAKDConfig(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # TrainingArguments' own checks
        raise ConfigError(str(err)) from err


def load_recipe(path: str, argv: Sequence[str] = ()) -> EAKDConfig:
    """Read a recipe YAML, apply ``--key value`` overrides, and validate the result."""
    values = read_yaml(path)
    check_keys(list(values), f"recipe {path}")
    overrides = parse_overrides(argv)
    check_keys(list(overrides), "the command line")
    values.update(overrides)
    return build_config(values, source=f"recipe {path}")
