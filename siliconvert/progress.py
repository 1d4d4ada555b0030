"""Progress bars for long stages (rich, on stderr; quiet when SILICONVERT_QUIET is set)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

console = Console(stderr=True)


def _quiet() -> bool:
    return bool(os.environ.get("SILICONVERT_QUIET"))


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield from `items` while drawing a bar named `description`."""
    if _quiet():
        yield from items
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
            del item  # before the next is made: a streamed tensor must not stay alive beside the next one


def say(message: str) -> None:
    """One line of status on stderr (stdout stays for results)."""
    if not _quiet():
        console.print(message, highlight=False)
