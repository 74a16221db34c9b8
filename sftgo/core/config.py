"""Config files for the typed dataclass configs of `sftgo-prep` and `sftgo-train`.

Input: a JSON, TOML or YAML file (by suffix: .toml, .yaml/.yml, anything else JSON) whose keys
are the dataclass's field names (dashes allowed), and the dataclass.
Output: a dict of values, each checked against its field's annotation: a string is never a
boolean or a number (`"trust_remote_code": "false"` is refused, not truthy), an int is a float
where a float is wanted, lists and dicts are checked element by element.  Unknown keys and
wrong types are one-sentence ConfigErrors (a ValueError) naming the key.
Cost: instant.  YAML is read with yaml.safe_load (no Python objects from the file).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import tomllib

from sftgo.core.errors import ConfigError


def _parse(path: str) -> dict:
    from sftgo.core.storage import local_path

    p = local_path(path, "--config")  # a file:// URL is its path; a store's URL is refused in one sentence
    suffix = p.suffix.lower()
    kind = "TOML" if suffix == ".toml" else "YAML" if suffix in (".yaml", ".yml") else "JSON"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read config file {path} ({exc}).") from None
    try:
        if kind == "TOML":
            values = tomllib.loads(text)
        elif kind == "YAML":
            import yaml

            values = yaml.load(text, Loader=_unique_key_yaml_loader())
        else:
            values = json.loads(text, object_pairs_hook=_unique_keys)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"Config file {path} is not valid {kind} ({str(exc).splitlines()[0]}).") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"Config file {path} is not valid {kind} ({str(exc).splitlines()[0]}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a table/object of settings.")
    return values


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all distinct (json keeps the last of a repeated key, silently)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"setting {key!r} is given twice")
        seen[key] = value
    return seen


def _unique_key_yaml_loader():
    """yaml's SafeLoader, refusing a mapping that repeats a key (safe_load keeps the last, silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            repeated = [k for i, k in enumerate(keys) if k in keys[:i]]
            if repeated:
                raise ValueError(f"setting {repeated[0]!r} is given twice")
            return super().construct_mapping(node, deep)

    return Loader


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value, tp, key: str):
    """`value` converted to the annotation `tp` (int -> float, list -> tuple), or a ConfigError
    naming `key`.  Supports None, bool, int, float, str, X | None, list[X], tuple[X, ...],
    tuple[X, Y], dict[str, X] and dict (any keys and values)."""
    if tp is dict:
        tp = dict[typing.Any, typing.Any]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return check_type(value, option, key)
            except ValueError as exc:
                errors.append(exc)
        raise _wrong(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _wrong(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, tp, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, tp, value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"Setting '{key}' must hold {len(args)} values, not {len(value)}.")
            return tuple(check_type(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else typing.Any
        items = [check_type(v, item, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:  # (a bare `dict`: keys and values of any type)
        if not isinstance(value, dict):
            raise _wrong(key, tp, value)
        k_tp, v_tp = typing.get_args(tp) or (typing.Any, typing.Any)
        return {check_type(k, k_tp, key): check_type(v, v_tp, key) for k, v in value.items()}
    if tp is typing.Any:
        return value
    raise TypeError(f"config field '{key}' has an annotation this reader does not support: {tp!r}")


def _wrong(key: str, tp, value) -> ConfigError:
    shown = json.dumps(value, ensure_ascii=True, default=str)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigError(f"Setting '{key}' must be {_type_name(tp)}, not {type(value).__name__} {shown}.")


def field_types(cls) -> dict[str, object]:
    """Field name -> resolved annotation of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def load_config_file(path: str, cls, skip: tuple[str, ...] = ()) -> dict:
    """Values of config file `path` for dataclass `cls`, type-checked field by field.
    `skip`: fields a file may not set (refused as unknown)."""
    values: dict = {}
    for key, value in _parse(path).items():
        name = str(key).replace("-", "_")
        if name in values:
            raise ConfigError(
                f"Config file {path} gives setting '{name}' twice (as '{name}' and '{name.replace('_', '-')}')."
            )
        values[name] = value
    types_ = {k: v for k, v in field_types(cls).items() if k not in skip}
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"Config file {path} has unknown setting(s): {', '.join(unknown)}.")
    return {k: check_type(v, types_[k], k) for k, v in values.items()}


def check_fields(obj) -> None:
    """Check every field of a dataclass instance against its annotation (values from Python
    callers, not only files, stay typed)."""
    for name, tp in field_types(type(obj)).items():
        setattr(obj, name, check_type(getattr(obj, name), tp, name))


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (what --help shows)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # wrapped in the source, one line here
    return docs


def field_default(cls, name: str):
    """The default of dataclass field `name` (its default_factory called)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
