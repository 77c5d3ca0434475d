"""Small helpers for the human-readable output of the tools."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def shape(s: Iterable[int]) -> str:
    return "x".join(str(int(x)) for x in s) or "scalar"


def counts(mapping: Mapping[Any, int], sep: str = ", ") -> str:
    return sep.join(f"{k} {v:,}" for k, v in mapping.items())


def metadata_lines(metadata: Mapping[str, str], width: int = 160) -> list[str]:
    """Metadata sorted by key; JSON values re-indented, very long ones (tag lists) cut."""
    lines = []
    for key in sorted(metadata):
        value = metadata[key]
        try:
            parsed = json.loads(value)
        except (ValueError, TypeError):
            parsed = None
        if isinstance(parsed, (dict, list)) and len(value) <= 2000:
            body = json.dumps(parsed, indent=2, ensure_ascii=False).replace("\n", "\n    ")
            lines.append(f"  {key}: {body}")
            continue
        if len(value) > width:
            value = value[:width] + f"... ({len(value):,} characters)"
        lines.append(f"  {key}: {value}")
    return lines


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
