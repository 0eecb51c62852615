"""Terminal rendering helpers (rich): progress bars on stderr, stats lines, errors."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

err_console = Console(stderr=True, highlight=False)


def error(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", markup=True, soft_wrap=True)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}", markup=True, soft_wrap=True)


@contextmanager
def token_progress(label: str, total: int, min_total: int = 256,
                   enabled: bool | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A prefill progress bar on stderr (tokens, tok/s, ETA) when stderr is a terminal and the input
    is long enough; yields a `progress(done, total)` callback, or None when silent."""
    on = sys.stderr.isatty() if enabled is None else enabled
    if not on or total < min_total:
        yield None
        return
    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
            TextColumn("{task.fields[tps]}"), TimeRemainingColumn()]
    with Progress(*cols, console=err_console, transient=True) as prog:
        task = prog.add_task(label, total=total, tps="")

        def update(done: int, tot: int) -> None:
            t = prog.tasks[0]
            speed = t.speed or 0.0
            prog.update(task, completed=done, total=tot, tps=f"{speed:,.0f} tok/s" if speed else "")

        yield update


def stats_line(stats) -> str:
    return (f"prefill {stats.prefill_tokens} tok at {stats.prefill_tps:,.1f} tok/s, "
            f"decode {stats.decode_tokens} tok at {stats.decode_tps:,.1f} tok/s")
