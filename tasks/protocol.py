"""Protocols are data: a dataclass per task family whose every field carries the source of its value.

`param(value, source)` declares a field; `with_overrides` applies `--demo` and `--set key=value`
overrides with type checking; `as_record` turns a protocol into the record's `protocol` section.
"""
import dataclasses
import typing

from evaluate.common import UserError


def param(default, source: str):
    """A protocol field with its default value and where that value comes from."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence-valued protocol fields")
    return dataclasses.field(default=default, metadata={"source": source})


def keys(protocol) -> list:
    return [f.name for f in dataclasses.fields(protocol)]


def _parse(text: str, kind, key):
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if origin is tuple:
            inner = typing.get_args(kind)[0]
            return tuple(_parse(part, inner, key) for part in text.split(",") if part.strip())
        if origin is typing.Union:  # Optional[X]
            if text.lower() in ("none", "null", ""):
                return None
            return _parse(text, [a for a in typing.get_args(kind) if a is not type(None)][0], key)
        return kind(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a value of type {getattr(kind, '__name__', kind)}")


def with_overrides(protocol, overrides: dict, parse_strings: bool):
    """A copy of `protocol` with `overrides` applied; strings are parsed to the field's type when asked."""
    fields = {f.name: f for f in dataclasses.fields(protocol)}
    hints = typing.get_type_hints(type(protocol))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"unknown protocol key {key!r}; valid keys: {', '.join(fields)}")
        changes[key] = _parse(value, hints[key], key) if parse_strings and isinstance(value, str) else value
    return dataclasses.replace(protocol, **changes)


def as_record(protocol, defaults) -> dict:
    """{key: {value, source}}; a value changed from the task's published protocol says so."""
    out = {}
    for f in dataclasses.fields(protocol):
        value = getattr(protocol, f.name)
        source = f.metadata.get("source", "")
        if value != getattr(defaults, f.name):
            source = f"overridden (published protocol: {getattr(defaults, f.name)!r}; {source})"
        out[f.name] = {"value": list(value) if isinstance(value, tuple) else value, "source": source}
    return out
