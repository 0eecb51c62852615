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


# ---- chat: streamed markdown answers, toolbar ----------------------------------------------
class _MarkdownTail:
    """The last screenful of the markdown rendering of `stream.text` (a live view cannot redraw
    lines that have scrolled off the screen, so it shows only what fits)."""

    def __init__(self, stream: "MarkdownStream"):
        self.stream = stream

    def __rich_console__(self, console, options):
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.stream.text), options, pad=False)
        for line in lines[-max(1, console.height - 2) :]:
            yield from line
            yield Segment.line()


class MarkdownStream:
    """Shows an answer while it arrives: on an interactive terminal as markdown re-rendered a few
    times a second (then printed whole once done); otherwise as plain text, piece by piece."""

    def __init__(self, console: Console, live: bool | None = None):
        self.console, self.text = console, ""
        self.live = console.is_interactive if live is None else live
        self._live = None

    def __enter__(self) -> "MarkdownStream":
        if self.live:
            from rich.live import Live

            self._live = Live(_MarkdownTail(self), console=self.console, refresh_per_second=8,
                              transient=True)
            self._live.start()
        return self

    def push(self, piece: str) -> None:
        self.text += piece
        if not self.live:
            self.console.file.write(piece)
            self.console.file.flush()

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            from rich.markdown import Markdown

            self._live.stop()
            if self.text:
                self.console.print(Markdown(self.text))
        elif self.text:
            self.console.file.write("\n")
            self.console.file.flush()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def toolbar_text(ctx_used: int, ctx_limit: int, stats, vram_used: int | None = None,
                 vram_budget: int | None = None, expert_hit_rate: float | None = None) -> str:
    """One line: context fill, last prefill / decode speed, VRAM, expert cache hit rate."""
    parts = [f"ctx {ctx_used:,}/{ctx_limit:,}",
             f"prefill {stats.prefill_tps:,.1f} tok/s", f"decode {stats.decode_tps:,.1f} tok/s"]
    if vram_used is not None:
        budget = f" / {format_bytes(vram_budget)}" if vram_budget else ""
        parts.append(f"VRAM {format_bytes(vram_used)}{budget}")
    if expert_hit_rate is not None:
        parts.append(f"experts hit {expert_hit_rate:.1%}")
    return " │ ".join(parts)
