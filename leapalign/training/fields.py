"""Validation of the config dataclasses' fields, done by pydantic.

``LeapAlignConfig``, ``RewardSpec`` and the objectives' config classes stay plain ``@dataclass``es
(``dataclasses.asdict``, the ``help`` metadata and the objectives read them). pydantic validates and
converts a mapping of field values against their annotations in lax mode (YAML's ``"1e-5"`` is a
float, ``"7"`` and ``7.0`` are ints, ``"false"`` is a bool), with two rules of ours on top: a bool is
never a number, and a single value given for a list field is a one-element list. A failure becomes
one :class:`ConfigError` line that names the field (``reward_specs[0].name``, ``objective.alpha``)
and, for an unknown key, suggests the closest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BeforeValidator, ConfigDict, TypeAdapter, ValidationError, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, TypedDict

from leapalign.training.errors import ConfigError

__all__ = ["validate_fields", "close_matches"]

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
}


def close_matches(key: str, names: typing.Iterable[str], prefix: str = "") -> str:
    """``"; did you mean a, b?"`` for the names closest to ``key`` (empty when none is close)."""
    close = difflib.get_close_matches(str(key), list(names), n=3)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def validate_fields(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` checked and converted against the fields of dataclass ``cls`` (only the keys given).

    ``where`` prefixes field names in errors (``"objective"`` -> ``objective.alpha``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of field -> value, got {type(data).__name__}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], cls, where)) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(_typed_dict(cls))


@functools.cache
def _typed_dict(cls: type) -> type:
    """A TypedDict of ``cls``'s init fields (those with defaults optional), forbidding other keys."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.init:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields[f.name] = _lax(hints[f.name]) if required else NotRequired[_lax(hints[f.name])]
    td = TypedDict(f"{cls.__name__}Fields", fields)  # type: ignore[misc]
    return with_config(ConfigDict(extra="forbid", coerce_numbers_to_str=True))(td)


def _lax(tp: Any) -> Any:
    """The pydantic type for annotation ``tp`` with our two rules (no bool as number, scalar -> list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float):
        return Annotated[tp, BeforeValidator(functools.partial(_no_bool, tp))]
    if origin in (Union, types.UnionType):
        return Union[tuple(_lax(a) for a in args)]
    if origin is list:
        return Annotated[list[_lax(args[0])], BeforeValidator(_as_list)]
    if origin is tuple:
        return tuple[tuple(a if a is Ellipsis else _lax(a) for a in args)]
    if tp is dict or origin is dict:
        return Annotated[tp, BeforeValidator(lambda v: {} if v is None else v)]
    if dataclasses.is_dataclass(tp):
        return Annotated[_typed_dict(tp), BeforeValidator(functools.partial(_dataclass_input, tp)),
                         AfterValidator(lambda values: tp(**values))]
    return tp


def _no_bool(tp: type, value: Any) -> Any:
    if isinstance(value, bool):
        kind = "int_type" if tp is int else "float_type"
        raise PydanticCustomError(kind, "a bool is not a number")
    return value


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, (str, dict)) or dataclasses.is_dataclass(value) else value


def _dataclass_input(tp: type, value: Any) -> Any:
    """An instance re-validates as its fields; a bare string names a dataclass with a ``name`` field."""
    if isinstance(value, tp):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(tp) if f.init}
    if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
        return {"name": value}
    return value


def _location(loc: tuple[Any, ...], where: str) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(err: dict[str, Any], cls: type, where: str) -> str:
    """One line for pydantic's first error: the field, what was given, what was expected."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    name = _location(loc, where)
    if kind == "extra_forbidden":
        parent = _location(loc[:-1], where)
        known = _known_keys(cls, loc[:-1])
        hint = close_matches(str(loc[-1]), known) or f"; known keys: {sorted(known)}"
        return f"unknown key {loc[-1]!r} in {parent or cls.__name__}{hint}"
    if kind == "missing":
        return f"{name} is missing (required)"
    if kind in _EXPECTED:
        nullable = len(loc) == 1 and type(None) in typing.get_args(typing.get_type_hints(cls).get(loc[0]))
        return f"{name}={value!r} is invalid: expected {_EXPECTED[kind]}" + (" (or null)" if nullable else "")
    if kind in ("dataclass_type", "model_type", "typed_dict_type"):
        return f"{name}={value!r} is invalid: expected a mapping of field -> value"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{name}: {message}" if name else message


def _known_keys(cls: type, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the dataclass found by walking ``loc`` (field names, list indices) from ``cls``."""
    tp: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
        while typing.get_origin(hint) in (list, Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        tp = hint
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []
