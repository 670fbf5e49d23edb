"""Human-readable documentation of every config field, generated from `raflora.config`."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from raflora.config import Config


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("Annotated[", "").split(", FieldInfo")[0]


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
                    field.description or "",
                )
            )
    return rows


def as_markdown() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, kind, default, text in fields():
        kind, text = kind.replace("|", "&#124;"), text.replace("|", "&#124;")
        lines.append(f"| `{name}` | {kind} | `{default}` | {text} |")
    return "\n".join(lines)


def as_text() -> str:
    width = max(len(name) for name, *_ in fields())
    return "\n".join(
        f"{name:<{width}}  {default:<12} {text}" for name, _, default, text in fields()
    )
