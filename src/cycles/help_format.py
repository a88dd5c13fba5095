"""Plain, copyable --help for every `cycles` command.

Typer's rich panels squeeze option tables into narrow columns (wrapping `ALLOW_WITH_OVERDRAFT` mid-word
at 80 columns) and keep docstring line breaks; its type labels read `<str>`, `<bool>`, `<list[str]>`
and required arguments `{file}`. Click's own formatter rewraps paragraphs to the terminal, so we turn
rich help off and name value types the way click does (TEXT, INTEGER, FILE).
"""

from __future__ import annotations

from typing import Any

import typer.core as _core
import typer.main as _main

_LABELS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "int range": "INTEGER", "float range": "FLOAT",
           "bool": "BOOLEAN", "path": "PATH", "file": "FILE", "directory": "DIR", "datetime": "DATETIME"}
_installed = False


def _label(raw: str) -> str:
    label = raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if label in _LABELS:
        return _LABELS[label]
    if "|" in label:
        return f"[{label}]"
    return label.upper()


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _core.HAS_RICH = False
    _main.HAS_RICH = False  # type: ignore[attr-defined]
    original = _core._TyperParameter.display_type

    def display_type(self: Any, ctx: Any) -> str:
        return _label(original(self, ctx))

    def argument_name(self: Any) -> str:
        name = (self.metavar or self.name or "").upper()
        return name + ("..." if self.nargs != 1 else "")

    def argument_usage(self: Any) -> str:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    _core._TyperParameter.display_type = display_type  # type: ignore[method-assign]
    _core.TyperArgument._rich_display_name = argument_name  # type: ignore[method-assign]
    _core.TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]
    _core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
