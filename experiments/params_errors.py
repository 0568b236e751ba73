"""One line for a params validation error: the key, the bad value and what is allowed.

pydantic's own message names the location as a tuple and lists every failed union member;
``format_error`` turns the first error into ``key=value <why>: <what is allowed>``, with "did
you mean" for unknown keys and where a moved key lives now.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

# keys that moved: (section, key) -> where they live now
MOVED = {("pmpl", "meta_split"): "data.meta_split",
         ("pmpl", "alpha_lr"): "recipes.<recipe>.alpha_lr (the search schedule is the recipe's)",
         ("pmpl", "deadline_epoch"): "recipes.<recipe>.deadline_epoch (the search schedule is "
                                     "the recipe's)"}


def _walk(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The model that ``loc`` ends in and the FieldInfo it names (None: the model itself)."""
    node: Any = root
    model, info = None, None
    for part in loc:
        while typing.get_origin(node) in (typing.Union, types.UnionType):
            node = next(a for a in typing.get_args(node) if a is not type(None))
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return node, None
            model, info = node, node.model_fields[part]
            node = info.annotation
        elif typing.get_origin(node) is dict:
            model, info = None, None
            node = typing.get_args(node)[1]
        else:
            return model, info
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node, None
    return model, info


def _bounds(info) -> str:
    lo = next((("(", m.gt) for m in info.metadata if isinstance(m, Gt)), None) or \
        next((("[", m.ge) for m in info.metadata if isinstance(m, Ge)), None)
    hi = next(((")", m.lt) for m in info.metadata if isinstance(m, Lt)), None) or \
        next((("]", m.le) for m in info.metadata if isinstance(m, Le)), None)
    if lo and hi:
        return f"must lie in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    op, value = (">" if lo[0] == "(" else ">=", lo[1]) if lo else ("<" if hi[0] == ")" else "<=",
                                                                    hi[1])
    return f"must be {op} {value}"


def _one_line(err: dict, root: type[BaseModel], prefix: tuple) -> str:
    loc = tuple(prefix) + tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    kind, value = err["type"], err.get("input")
    model, info = _walk(root, tuple(err["loc"]))
    if kind == "params":
        return err["ctx"]["message"]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1])
        moved = MOVED.get((str(loc[-2]) if len(loc) > 1 else "", str(loc[-1])))
        if moved:
            return f"{key} moved to {moved}: set it there"
        names = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"unknown key {key}{hint}: allowed keys {'in ' + section + ' ' if section else ''}"
                f"are {', '.join(names)}")
    if info is not None and "float" in str(info.annotation) and type(value) is int:
        value = float(value)  # as the schema coerces it
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}={value!r} {_bounds(info)}"
    if kind == "literal_error":
        expected = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{key}={value!r} is invalid: choose from {expected}"
    if kind == "value_error":
        message = str(err["ctx"]["error"])
        if info is None:  # a model-level rule: its message starts with the key in that model
            return f"{key + '.' if key else ''}{message}"
        return f"{key}={value!r} is invalid: {message}"
    if kind == "missing":
        return f"{key} is missing"
    if kind.endswith(("_type", "_parsing")):
        expected = {"string": "str", "model": "mapping", "dict": "mapping"}.get(
            kind.split("_")[0], kind.split("_")[0])
        return f"{key}={value!r} is invalid: expected {expected}"
    return f"{key}={value!r} is invalid: {err['msg'][0].lower()}{err['msg'][1:]}"


def format_error(exc: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """The first error of ``exc`` as one line naming the key (``prefix`` + its location)."""
    return _one_line(exc.errors(include_url=False)[0], root, prefix)
