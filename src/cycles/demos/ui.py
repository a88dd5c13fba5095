"""Small rich helpers shared by the demos."""

from __future__ import annotations

from typing import Iterable

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .backend import money


def make_console() -> Console:
    # Text output stays plain when piped (no colour codes), so captures and tests read the same words.
    return Console(highlight=False, soft_wrap=False)


def kv(rows: Iterable[tuple[str, object]], *, key_style: str = "bold") -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style=key_style, no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return grid


def short_scope(scope: str) -> str:
    """The last segment of a scope path, indented by its depth: 'tenant:t/workspace:w' -> '  workspace:w'."""
    parts = scope.split("/")
    return "  " * (len(parts) - 1) + parts[-1]


def balance_table(title: str, scopes: list[str], balances: dict[str, dict[str, int]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("Scope (GET /v1/balances)", no_wrap=True)
    table.add_column("Allocated", justify="right")
    table.add_column("Spent", justify="right")
    table.add_column("Remaining", justify="right")
    for scope in scopes:
        b = balances.get(scope)
        if b is None:
            table.add_row(short_scope(scope), "—", "—", "—")
            continue
        table.add_row(short_scope(scope), money(b["allocated"]), money(b["spent"]), money(b["remaining"]))
    return table


def live(console: Console, get_renderable: object) -> Live:
    """A live view; on a pipe or file rich prints only its final frame, and this ends that frame's line."""

    class _Live(Live):
        def stop(self) -> None:
            super().stop()
            if not self.console.is_terminal:
                self.console.line()

    return _Live(console=console, refresh_per_second=8, get_renderable=get_renderable)  # type: ignore[arg-type]
