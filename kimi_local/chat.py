"""`kimi-local chat`: an interactive REPL over one persistent recurrent state.

`Conversation` is the engine side (no terminal I/O): messages, the KimiCache that holds exactly
the conversation's tokens, sampling settings. Each turn prefills only its new tokens. `Repl` is
the terminal side: prompt-toolkit input, rich output, slash commands, Ctrl-C handling.
"""
from __future__ import annotations

import itertools
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from kimi_local.cache import ContextOverflow
from kimi_local.generate import SamplingParams, Stats, generate
from kimi_local.session import SessionError, read_session, restore_cache, save_session


class ChatError(Exception):
    """A user mistake inside the REPL (bad command argument, ...): shown, the REPL goes on."""


class PrefillInterrupted(Exception):
    """Ctrl-C while a message was being prefilled: the turn is dropped."""


@dataclass
class Turn:
    user: dict  # the user message, documents included
    ids: list[int]  # the new tokens to prefill


class Snapshot:
    """A cache as it was before a turn, for /retry and for dropping an interrupted prefill. Only the
    KDA states and conv tails are copied (a few MB): MLA latent rows and token ids below `pos` are
    append-only, so rewinding sets `pos` back. (cache.clone() would copy the whole MLA cache, which
    the GPU engine preallocates for the full context.) Valid while the cache is not reset or loaded."""

    def __init__(self, cache):
        self.kda = {i: t.clone() for i, t in cache.kda_state.items()}
        self.conv = {i: t.clone() for i, t in cache.conv.items()}
        self.pos = cache.pos

    def rewind(self, cache) -> None:
        for i, t in cache.kda_state.items():
            t.copy_(self.kda[i])
        for i, t in cache.conv.items():
            t.copy_(self.conv[i])
        cache.pos, cache.tokens = self.pos, cache.tokens[: self.pos]


def clear_cache(cache) -> None:
    """An empty conversation in the same cache (its buffers, and any CUDA graph over them, stay)."""
    for t in (*cache.kda_state.values(), *cache.conv.values()):
        t.zero_()
    cache.pos, cache.tokens = 0, []


def _seed(value: str) -> int | None:
    return None if value.lower() in ("none", "off", "random") else int(value)


# /set KEY VALUE: key -> parser (validated afterwards by SamplingParams.validate / max_tokens >= 1)
SETTINGS: dict[str, Callable[[str], object]] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repeat_penalty": float, "seed": _seed, "max_tokens": int,
}


class Conversation:
    def __init__(self, model, params: SamplingParams, max_tokens: int, system: str | None = None,
                 ctx: int | None = None):
        self.model, self.tok = model, model.tokenizer
        self.params, self.max_tokens, self.system = params, max_tokens, system
        self.cache = model.new_cache(ctx)
        self.messages: list[dict] = []  # user and assistant turns; the system prompt is separate
        self.documents: list[tuple[str, str]] = []  # (name, text) sent with the next message
        self.last = Stats()  # the last turn
        self.turns = 0
        self.total_prefilled = 0
        self.interrupted = False
        self._before: tuple | None = None  # (Snapshot, messages, Turn) from before the last turn

    # ---- turns ---------------------------------------------------------------------------
    def start_turn(self, text: str) -> Turn:
        """The turn for a user message (with any /file documents); changes nothing yet."""
        user = {"role": "user", "content": self._with_documents(text)}
        return Turn(user, self._new_ids(user))

    def retry_turn(self) -> Turn:
        """Roll back to the state before the last answer; returns that turn to run again."""
        if self._before is None:
            raise ChatError("nothing to retry")
        self._rewind()
        return self._before[2]

    def run_turn(self, turn: Turn, stop: Callable[[], bool] = lambda: False,
                 progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Prefill the turn's new tokens, then yield the answer's text, one string per token
        (often empty). `stop()` is polled between tokens; when it says so the answer ends there and
        the cache holds exactly the tokens whose text was yielded (with a CUDA decode stream, that
        includes the one token already fed ahead). If the prefill fails, the turn is rolled back."""
        self.cache.check_room(len(turn.ids) + 1)
        if self._before is None or self._before[2] is not turn:
            self._before = (Snapshot(self.cache), list(self.messages), turn)
        self.messages.append(turn.user)
        self.last, self.interrupted = Stats(), False
        dec, text = self.tok.decode_stream(), []
        tokens = generate(self.model.net, self.cache, turn.ids, self.params, self.max_tokens,
                          self.tok.stop_ids, self.last, progress=progress)
        try:
            for tok in tokens:
                piece = "" if tok in self.tok.stop_ids else dec.push(tok)
                text.append(piece)
                yield piece
                if stop():
                    self.interrupted = True
                    break
            tokens.close()
            for tok in self.last.unyielded:  # fed ahead by the CUDA decode stream: in the cache, so in the answer
                piece = "" if tok in self.tok.stop_ids else dec.push(tok)
                text.append(piece)
                yield piece
            tail = dec.flush()
            text.append(tail)
            yield tail
        finally:
            tokens.close()
            self._finish(turn, "".join(text))

    def _finish(self, turn: Turn, answer: str) -> None:
        if not self.last.prefill_tokens:  # the prefill did not complete: forget the turn
            self._rewind()
            return
        self.documents = []
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        self.total_prefilled += self.last.prefill_tokens

    def _rewind(self) -> None:
        snapshot, messages, _ = self._before
        snapshot.rewind(self.cache)
        self.messages = list(messages)

    def _new_ids(self, user: dict) -> list[int]:
        if self.cache.pos == 0:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.tok.encode_chat(system + [user], add_generation_prompt=True)
        ids = self.tok.encode_chat_continuation([user], add_generation_prompt=True)
        if self.cache.tokens[-1] != self.tok.im_end_id:  # the last answer was cut short
            ids = [self.tok.im_end_id] + ids
        return ids

    def _with_documents(self, text: str) -> str:
        docs = [f"{name}:\n\n{body}" for name, body in self.documents]
        return "\n\n".join(docs + [text])

    # ---- commands ------------------------------------------------------------------------
    def reset(self) -> None:
        clear_cache(self.cache)
        self.messages, self.documents, self._before = [], [], None

    def set_system(self, text: str | None) -> None:
        """A new system prompt starts a new conversation (it is the first thing in the state)."""
        self.system = text or None
        self.reset()

    def set(self, key: str, value: str) -> None:
        if key not in SETTINGS:
            raise ChatError(f"unknown setting {key!r} (one of: {', '.join(SETTINGS)})")
        try:
            v = SETTINGS[key](value)
        except ValueError:
            raise ChatError(f"{key}: {value!r} is not a valid value") from None
        if key == "max_tokens":
            if v < 1:
                raise ChatError("max_tokens must be >= 1")
            self.max_tokens = v
            return
        params = replace(self.params, **{key: v})
        try:
            params.validate()
        except ValueError as e:
            raise ChatError(str(e)) from None
        self.params = params

    def add_document(self, path: Path) -> tuple[int, bool]:
        """Attach a text file to the next message; returns (its token count, whether it had
        invalid UTF-8)."""
        try:
            raw = Path(path).expanduser().read_bytes()
        except OSError as e:
            raise ChatError(f"can't read {path}: {e.strerror or e}") from None
        text = raw.decode("utf-8", errors="replace")
        self.documents.append((Path(path).name, text))
        return len(self.tok.encode(text)), "\ufffd" in text and "\ufffd".encode() not in raw

    def save(self, path: Path) -> None:
        meta = {"messages": self.messages, "system": self.system, "sampling": self.params.to_dict(),
                "max_tokens": self.max_tokens}
        save_session(Path(path).expanduser(), self.model, self.cache, meta)

    def load(self, path: Path) -> None:
        """Replace the conversation by a saved one; on any error nothing changes."""
        path = Path(path).expanduser()
        tensors, meta = read_session(path, self.model)
        try:
            params = SamplingParams(**meta.get("sampling", {}))
            params.validate()
            messages, max_tokens = list(meta["messages"]), int(meta.get("max_tokens", self.max_tokens))
        except (TypeError, ValueError, KeyError):
            raise SessionError(f"{path}: bad session metadata") from None
        restore_cache(tensors, self.cache, path)  # checks before it changes anything
        self.params, self.max_tokens, self.messages, self.system = params, max_tokens, messages, meta.get("system")
        self.documents, self._before = [], None


# ---- terminal side -------------------------------------------------------------------------
HELP = [
    ("/help", "", "this list"),
    ("/reset", "", "start a new conversation (keeps the system prompt)"),
    ("/system", "TEXT", "set the system prompt and start a new conversation (no TEXT: show it)"),
    ("/save", "FILE", "save the conversation and its state to a session file"),
    ("/load", "FILE", "continue a saved session"),
    ("/retry", "", "regenerate the last answer"),
    ("/stats", "", "context, token counts and speeds"),
    ("/set", "KEY VALUE", "sampling: " + ", ".join(SETTINGS)),
    ("/file", "PATH", "add a text file to the next message"),
    ("/exit", "", "quit (also Ctrl-D)"),
]
KEYS = ("Enter sends · Esc-Enter or Alt-Enter inserts a newline · Ctrl-C stops an answer · "
        "Ctrl-D or /exit quits · /help lists commands")


@contextmanager
def sigint_flag() -> Iterator[Callable[[], bool]]:
    """While active, Ctrl-C only sets a flag (checked between tokens); a forward is never cut."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: hit.set())
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, old)


def _checking_progress(bar, stopped: Callable[[], bool]) -> Callable[[int, int], None]:
    """Progress callback (called between prefill chunks) that aborts the prefill on Ctrl-C."""
    def progress(done: int, total: int) -> None:
        if stopped():
            raise PrefillInterrupted
        if bar is not None:
            bar(done, total)
    return progress


def expert_hit_rate(net) -> float | None:
    """The expert cache's hit rate when experts are offloaded (`net.expert_stats`, set by --vram)."""
    stats = getattr(net, "expert_stats", None)
    return None if stats is None else float(stats.hit_rate)


class Repl:
    def __init__(self, conv: Conversation, name: str, session: Path | None = None,
                 vram: int | None = None):
        from rich.console import Console

        self.conv, self.name, self.session, self.vram = conv, name, session, vram
        self.console = Console(highlight=False, soft_wrap=True)
        self.commands = {
            "/help": self.cmd_help, "/reset": self.cmd_reset, "/system": self.cmd_system,
            "/save": self.cmd_save, "/load": self.cmd_load, "/retry": self.cmd_retry,
            "/stats": self.cmd_stats, "/set": self.cmd_set, "/file": self.cmd_file,
            "/exit": self.cmd_exit, "/quit": self.cmd_exit,
        }
        self.prompt = self._prompt_session() if sys.stdin.isatty() and sys.stdout.isatty() else None

    # ---- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.console.print(f"[bold]kimi-local chat[/] · {self.name}\n[dim]{KEYS}[/]")
        if self.conv.messages:
            self.console.print(f"[dim]resumed {self.session}: {len(self.conv.messages)} messages, "
                               f"{self.conv.cache.pos} tokens in context[/]")
        while True:
            try:
                if self.handle(self._read_line()) == "exit":
                    break
            except KeyboardInterrupt:  # at the prompt (or between turns): nothing to stop
                self.console.print("[dim]use Ctrl-D or /exit to quit[/]")
            except EOFError:
                break
        self.autosave()
        return 0

    def handle(self, line: str) -> str | None:
        if line.startswith("/"):
            return self.command(line.strip())
        if line.strip():
            self.respond(lambda: self.conv.start_turn(line))
        return None

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            self._error(f"unknown command {name} (/help lists them)")
            return None
        try:
            return handler(arg.strip())
        except (ChatError, SessionError) as e:
            self._error(str(e))
        return None

    def respond(self, make_turn: Callable[[], Turn]) -> None:
        """Run one turn: prefill (progress bar for long inputs), stream the answer, report."""
        from kimi_local.ui import MarkdownStream, token_progress

        try:
            turn = make_turn()
            with sigint_flag() as stopped:
                with token_progress("prefill", len(turn.ids)) as bar:
                    pieces = self.conv.run_turn(turn, stopped, _checking_progress(bar, stopped))
                    first = next(pieces)  # the prefill runs here
                with MarkdownStream(self.console) as out:
                    for piece in itertools.chain([first], pieces):
                        out.push(piece)
        except PrefillInterrupted:
            self.console.print("[yellow]prefill interrupted; the message was dropped[/]")
            return
        except (ContextOverflow, ChatError) as e:
            self._error(str(e))
            return
        if self.conv.interrupted:
            self.console.print("[yellow]⏹ stopped[/]")
        self.console.print(f"[dim]{self._turn_line()}[/]")

    def autosave(self) -> None:
        if self.session is not None:
            try:
                self.conv.save(self.session)
                self.console.print(f"[dim]session saved to {self.session}[/]")
            except OSError as e:
                self._error(f"can't save the session to {self.session}: {e}")

    # ---- slash commands ------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        for name, args, text in HELP:
            self.console.print(f"  {name + ' ' + args:<17} {text}", markup=False)
        self.console.print(f"[dim]{KEYS}[/]")

    def cmd_reset(self, arg: str) -> None:
        self.conv.reset()
        self.console.print("[dim]conversation reset[/]")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.console.print(f"system prompt: {self.conv.system!r}", markup=False)
            return
        self.conv.set_system(arg)
        self.console.print("[dim]system prompt set; conversation reset[/]")

    def cmd_save(self, arg: str) -> None:
        path = self._path_arg(arg, "/save FILE")
        try:
            self.conv.save(path)
        except OSError as e:
            raise ChatError(f"can't save to {path}: {e.strerror or e}") from None
        self.console.print(f"[dim]saved {self.conv.cache.pos} tokens to {path}[/]")

    def cmd_load(self, arg: str) -> None:
        path = self._path_arg(arg, "/load FILE")
        self.conv.load(path)
        self.console.print(f"[dim]loaded {path}: {len(self.conv.messages)} messages, "
                           f"{self.conv.cache.pos} tokens in context[/]")

    def cmd_retry(self, arg: str) -> None:
        self.respond(self.conv.retry_turn)

    def cmd_stats(self, arg: str) -> None:
        c, s, p = self.conv, self.conv.last, self.conv.params
        rows = [
            ("context", f"{c.cache.pos:,} / {c.cache.max_ctx:,} tokens"),
            ("last turn", f"prefilled {s.prefill_tokens} new tokens at {s.prefill_tps:,.1f} tok/s; "
                          f"decoded {s.decode_tokens} tokens at {s.decode_tps:,.1f} tok/s"),
            ("session", f"{c.turns} turns, {c.total_prefilled:,} tokens prefilled in total"),
            ("sampling", " ".join(f"{k}={v}" for k, v in p.to_dict().items() if k in SETTINGS)
                         + f" max_tokens={c.max_tokens}"),
        ]
        vram, hit = self._vram_used(), expert_hit_rate(c.model.net)
        if vram is not None:
            rows.append(("VRAM", f"{vram / 2**30:.2f} GiB"))
        if hit is not None:
            rows.append(("experts", f"cache hit rate {hit:.1%}"))
        for k, v in rows:
            self.console.print(f"  {k:<10} {v}", markup=False)

    def cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise ChatError("usage: /set KEY VALUE (keys: " + ", ".join(SETTINGS) + ")")
        self.conv.set(key, value.strip())
        self.console.print(f"[dim]{key} = {value.strip()}[/]")

    def cmd_file(self, arg: str) -> None:
        path = self._path_arg(arg, "/file PATH")
        n, bad_utf8 = self.conv.add_document(path)
        if bad_utf8:
            self.console.print("[yellow]warning:[/] not valid UTF-8; invalid bytes were replaced")
        self.console.print(f"[dim]added {path.name} ({n} tokens); it goes with your next message[/]")

    def cmd_exit(self, arg: str) -> str:
        return "exit"

    # ---- helpers -------------------------------------------------------------------------
    def _path_arg(self, arg: str, usage: str) -> Path:
        if not arg:
            raise ChatError(f"usage: {usage}")
        return Path(arg).expanduser()

    def _read_line(self) -> str:
        """The next message: prompt-toolkit on a terminal, plain lines from a pipe."""
        return self.prompt.prompt("> ") if self.prompt is not None else input("> ")

    def _error(self, msg: str) -> None:
        self.console.print(f"[bold red]error:[/] {msg}", markup=True)

    def _turn_line(self) -> str:
        c, s = self.conv, self.conv.last
        return (f"{s.prefill_tokens} new tokens prefilled · {c.cache.pos:,}/{c.cache.max_ctx:,} in "
                f"context · {s.decode_tokens} tokens at {s.decode_tps:,.1f} tok/s")

    def _vram_used(self) -> int | None:
        dev = self.conv.model.device
        return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None

    def _toolbar(self) -> str:
        from kimi_local.ui import toolbar_text

        c = self.conv
        return toolbar_text(c.cache.pos, c.cache.max_ctx, c.last, self._vram_used(), self.vram,
                            expert_hit_rate(c.model.net))

    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        from kimi_local.paths import data_dir

        kb = KeyBindings()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        try:
            history = FileHistory(str(data_dir() / "history"))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history, key_bindings=kb, completer=SlashCompleter(),
                             complete_while_typing=True, bottom_toolbar=self._toolbar)


class SlashCompleter(Completer):
    """Completes command names, /set keys, and file paths after /file, /load, /save."""

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        name, space, arg = text.partition(" ")
        if not space:
            for cmd, args, help_text in HELP:
                if cmd.startswith(name):
                    yield Completion(cmd, -len(name), display_meta=help_text)
        elif name == "/set" and " " not in arg:
            for key in SETTINGS:
                if key.startswith(arg):
                    yield Completion(key, -len(arg))
        elif name in ("/file", "/load", "/save"):
            yield from PathCompleter(expanduser=True).get_completions(Document(arg), complete_event)


def run_chat(model, params: SamplingParams, max_tokens: int, system: str | None, ctx: int | None,
             session: Path | None, vram: int | None, name: str) -> int:
    """The `chat` command after option parsing. SessionError from --session propagates."""
    conv = Conversation(model, params, max_tokens, system, ctx)
    if session is not None and session.exists():
        conv.load(session)
    return Repl(conv, name, session, vram).run()
