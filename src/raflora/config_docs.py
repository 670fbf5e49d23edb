"""Human-readable documentation of every config field, generated from `raflora.config`."""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from raflora.config import Config


def _type_name(annotation: Any) -> str:
    """``int``, ``list[int] | None``, ``"adapter" | "merge"``… for a field's annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def fields() -> list[tuple[str, str, str, str]]:
    """``(dotted name, type, default as TOML-ish text, description)`` for every field."""
    rows = []
    for section, info in Config.model_fields.items():
        model: type[BaseModel] = info.annotation  # type: ignore[assignment]
        defaults = model().model_dump(mode="json")
        for name, field in model.model_fields.items():
            default = json.dumps(defaults[name]) if defaults[name] is not None else "(unset)"
            rows.append(
                (
                    f"{section}.{name}",
                    _type_name(field.annotation),
                    default,
                    " ".join((field.description or "").split()),
                )
            )
    return rows


def as_markdown() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, kind, default, text in fields():
        kind, text = (
            t.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;") for t in (kind, text)
        )
        lines.append(f"| `{name}` | {kind} | `{default}` | {text} |")
    return "\n".join(lines)


def as_text() -> str:
    width = max(len(name) for name, *_ in fields())
    return "\n".join(
        f"{name:<{width}}  {default:<12} {text}" for name, _, default, text in fields()
    )
