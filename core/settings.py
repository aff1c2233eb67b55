"""The one way to declare a setting (its value and the source of that value) and the one override parser.

Pretraining configs, task protocols and the detection recipes are dataclasses whose fields are declared
with `setting(value, source)`. `with_overrides` applies YAML values or `KEY=VALUE` strings to any of them,
with the same type checking and the same error for an unknown key; `as_record` writes every value with
its source into a result record.
"""
import dataclasses
import typing
from pathlib import Path

import yaml

from core.cli import UserError


def setting(default, source: str, choices=None):
    """A field with its default value, where that value comes from, and optionally the values it may take."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence-valued settings")
    metadata = {"source": source}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def keys(settings) -> list:
    return [f.name for f in dataclasses.fields(settings)]


def source(settings, key: str) -> str:
    return {f.name: f for f in dataclasses.fields(settings)}[key].metadata.get("source", "")


def split_assignments(items, what: str) -> dict:
    """["key=value", ...] -> {key: "value"}; `what` names the option in the error ("--set", "override")."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def unknown_key(key, valid, what: str) -> UserError:
    return UserError(f"unknown {what} key {key!r}; valid keys: {', '.join(valid)}")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _parse_text(text: str, kind, key, what):
    """A command-line string as a value of type `kind` (bool, int, float, str, tuple[X, ...], Optional, Union)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return yaml.safe_load(text)
    if origin is typing.Union:
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _parse_text(text, inner, key, what)
            except UserError:
                continue
        raise UserError(f"{what} {key}={text}: expected {_type_name(kind)}")
    if origin is tuple:
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        return tuple(_parse_text(part.strip(), args[0], key, what) for part in body.split(",") if part.strip())
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise UserError(f"{what} {key}={text}: expected {_type_name(kind)}") from None


def _coerce(value, kind, key, what):
    """A YAML (or Python) value checked against `kind`: ints become floats, lists tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, inner, key, what)
            except UserError:
                continue
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], key, what) for v in value)
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind in (int, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(f"{what} {key}={value!r}: expected {_type_name(kind)}")


def with_overrides(settings, overrides: dict, what: str = "setting"):
    """A copy of `settings` with `overrides` applied: strings are parsed to each field's type, other values
    checked against it; a field declared with choices must take one of them."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(type(settings))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise unknown_key(key, list(fields), what)
        kind = hints[key]
        changes[key] = _parse_text(value, kind, key, what) if isinstance(value, str) and kind is not str \
            else _coerce(value, kind, key, what)
    out = dataclasses.replace(settings, **changes)
    check_choices(out, what)
    return out


def check_choices(settings, what: str = "setting") -> None:
    for f in dataclasses.fields(settings):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(settings, f.name) not in choices:
            raise UserError(f"{what} {f.name}={getattr(settings, f.name)!r} is not one of "
                            f"{', '.join(map(str, choices))}")


def with_preset(settings, presets: dict, name: str, what: str = "setting"):
    """The published protocol called `name`: `presets[name]` ({key: (value, source)}) over `settings`, with its
    `protocol` field set to `name`. A task's presets are the protocols of the sources it can be measured by."""
    if name not in presets:
        raise UserError(f"{what} protocol={name!r} is not one of {', '.join(presets)}")
    return with_overrides(settings, {"protocol": name, **{k: v for k, (v, _) in presets[name].items()}}, what)


def as_record(settings, defaults, presets=None) -> dict:
    """{key: {value, source}}; the source of a value set by the active preset is the preset's; a value changed
    from `defaults` (the published protocol) says so."""
    chosen = (presets or {}).get(getattr(settings, "protocol", None), {})
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        src = chosen[f.name][1] if f.name in chosen else f.metadata.get("source", "")
        if value != getattr(defaults, f.name):
            src = f"overridden (published protocol: {getattr(defaults, f.name)!r}; {src})"
        out[f.name] = {"value": list(value) if isinstance(value, tuple) else value, "source": src}
    return out


def load_yaml_values(path: Path, config_dir: Path) -> dict:
    """A YAML config's values, merged over the one `base:` config it may name (one level only, so that the
    value in force is always in one of two files)."""
    def read(p: Path) -> dict:
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"config {p} is not a mapping of key: value")
        return values

    values = read(path)
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = config_dir / f"{base}.yaml"
    if not base_path.is_file():
        known = ", ".join(sorted(p.stem for p in config_dir.glob("*.yaml")))
        raise UserError(f"config {path.name} names base: {base}, but there is no {base_path} (known: {known})")
    base_values = read(base_path)
    if "base" in base_values:
        raise UserError(f"config {base} has a base of its own; only one level of `base:` is allowed")
    return {**base_values, **values}
