"""`kimi-local chat` driven through a pseudo-terminal (pexpect) on the tiny model."""
import os
import re
import subprocess
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")

TURN = re.compile(r"(\d+) new tokens prefilled · ([\d,]+)/[\d,]+ in context · (\d+) tokens")


def _spawn(tiny_dir, tmp_path, *args, max_tokens=8, term="dumb"):
    env = dict(os.environ, TERM=term, PROMPT_TOOLKIT_NO_CPR="1", XDG_DATA_HOME=str(tmp_path / "xdg"),
               NO_COLOR="1", COLUMNS="200", LINES="50")
    cmd = ["-m", "kimi_local.cli", "chat", str(tiny_dir), "--device", "cpu", "--temperature", "0",
           "--max-tokens", str(max_tokens), *args]
    c = pexpect.spawn(sys.executable, cmd, env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    c.expect("/help lists commands")
    c.expect("> ")
    return c


def _turn(c, text: str) -> tuple[int, int, int]:
    """Send one message; (new tokens prefilled, tokens in context, tokens decoded)."""
    c.send(text + "\r")
    c.expect(TURN)
    n, ctx, dec = (int(g.replace(",", "")) for g in c.match.groups())
    c.expect("> ")
    return n, ctx, dec


def _cmd(c, line: str) -> str:
    """Run a slash command; its output."""
    c.send(line + "\r")
    c.expect("\r\n> ")
    return c.before


def _user(text):
    return {"role": "user", "content": text}


def test_turns_prefill_only_new_tokens_and_input_keys(tiny_dir, tiny_model, tmp_path):
    tok = tiny_model.tokenizer
    c = _spawn(tiny_dir, tmp_path)
    n1, ctx1, d1 = _turn(c, "hello there")
    assert n1 == len(tok.encode_chat([_user("hello there")]))
    assert ctx1 == n1 + d1
    n2, ctx2, d2 = _turn(c, "and how are you?")
    new = len(tok.encode_chat_continuation([_user("and how are you?")]))
    assert n2 in (new, new + 1)  # + <|im_end|> when the first answer was cut by --max-tokens
    assert ctx2 == ctx1 + n2 + d2  # the earlier turn was not processed again
    assert f"prefilled {n2} new tokens" in _cmd(c, "/stats")
    # Esc-Enter (= Alt-Enter) inserts a newline instead of sending
    _cmd(c, "/reset")
    n, _, _ = _turn(c, "line one\x1b\rline two")
    assert n == len(tok.encode_chat([_user("line one\nline two")]))
    # a bracketed paste of several lines is one message
    _cmd(c, "/reset")
    n, _, _ = _turn(c, "\x1b[200~first\nsecond\x1b[201~")
    assert n == len(tok.encode_chat([_user("first\nsecond")]))
    c.send("\x04")  # Ctrl-D
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert "line one" in (tmp_path / "xdg" / "kimi-local" / "history").read_text()


def test_slash_commands(tiny_dir, tiny_model, tmp_path):
    tok = tiny_model.tokenizer
    c = _spawn(tiny_dir, tmp_path)
    out = _cmd(c, "/help")
    assert all(name in out for name in ("/reset", "/system", "/save", "/load", "/retry", "/stats",
                                        "/set", "/file", "/exit", "Esc-Enter"))
    assert "unknown command" in _cmd(c, "/nope")
    # /set: valid and invalid values
    assert "top_k = 5" in _cmd(c, "/set top_k 5")
    assert "top_p must be" in _cmd(c, "/set top_p 2")
    assert "not a valid value" in _cmd(c, "/set temperature warm")
    assert "unknown setting" in _cmd(c, "/set colour 1")
    assert "usage" in _cmd(c, "/set seed")
    _cmd(c, "/set seed none")
    _cmd(c, "/set max_tokens 6")
    assert "top_k=5" in _cmd(c, "/stats") and "max_tokens=6" in _cmd(c, "/stats")
    _cmd(c, "/set top_k 0")
    # /system starts over with the system turn first
    assert "conversation reset" in _cmd(c, "/system You are terse.")
    assert "You are terse." in _cmd(c, "/system")
    n, ctx, d = _turn(c, "hi")
    assert n == len(tok.encode_chat([{"role": "system", "content": "You are terse."}, _user("hi")]))
    assert d <= 6
    # /retry regenerates from the snapshot taken before the answer: greedy -> the same turn again
    c.send("/retry\r")
    c.expect(TURN)
    assert [int(g.replace(",", "")) for g in c.match.groups()] == [n, ctx, d]
    c.expect("> ")
    # /save, /load (also of bad files: the REPL keeps going with its state)
    session = tmp_path / "s.safetensors"
    assert "saved" in _cmd(c, f"/save {session}") and session.is_file()
    (tmp_path / "bad.safetensors").write_bytes(b"not a session")
    assert "not a kimi-local session file" in _cmd(c, f"/load {tmp_path / 'bad.safetensors'}")
    assert "can't read" in _cmd(c, f"/load {tmp_path / 'missing.safetensors'}")
    assert f"{ctx} / " in _cmd(c, "/stats")
    assert "conversation reset" in _cmd(c, "/reset")
    assert "0 / " in _cmd(c, "/stats")
    assert f"{ctx} tokens in context" in _cmd(c, f"/load {session}")
    n2, ctx2, d2 = _turn(c, "more")
    assert ctx2 == ctx + n2 + d2
    # /file: a document goes with the next message
    assert "can't read" in _cmd(c, f"/file {tmp_path / 'nope.txt'}")
    doc = tmp_path / "doc.txt"
    doc.write_text("Recurrent state carries over between turns.\n" * 10)
    _cmd(c, "/reset")
    assert "added doc.txt" in _cmd(c, f"/file {doc}")
    n3, _, _ = _turn(c, "summarise")
    content = "doc.txt:\n\n" + doc.read_text() + "\n\nsummarise"
    assert n3 == len(tok.encode_chat([{"role": "system", "content": "You are terse."}, _user(content)]))
    c.send("/exit\r")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_ctrl_c(tiny_dir, tiny_model, tmp_path):
    tok = tiny_model.tokenizer
    c = _spawn(tiny_dir, tmp_path, max_tokens=3000)
    time.sleep(0.5)  # let prompt-toolkit switch the terminal to raw mode
    c.send("\x03")  # at the empty prompt: harmless
    c.expect("use Ctrl-D or /exit to quit")
    c.expect("> ")
    for _ in range(3):
        # greedy, the seed-0 tiny model answers this with > 400 tokens ("tell me a long story" stops
        # after 17, which a fast machine finishes before the Ctrl-C arrives)
        c.send("write a poem\r")
        c.expect("write a poem\r\r\n")
        c.expect(r"\S")  # the answer is streaming (or, on a slow machine, still being prefilled)
        time.sleep(0.3)
        c.send("\x03")
        if c.expect(["stopped", "prefill interrupted"]) == 0:
            break
        c.expect("> ")  # the message was dropped: the state is as before
        assert "  context    0 / " in _cmd(c, "/stats")
    c.expect(TURN)
    n, ctx, d = (int(g.replace(",", "")) for g in c.match.groups())
    assert ctx == n + d and 1 <= d < 3000  # the state holds exactly the tokens kept
    c.expect("> ")
    _cmd(c, "/set max_tokens 4")
    n2, ctx2, d2 = _turn(c, "go on")
    # the cut answer gets its <|im_end|> before the next turn; nothing earlier is re-processed
    assert n2 == len(tok.encode_chat_continuation([_user("go on")])) + 1
    assert ctx2 == ctx + n2 + d2
    c.send("\x04")  # Ctrl-D
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_session_option_and_bad_inputs(tiny_dir, tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    base = [sys.executable, "-m", "kimi_local.cli", "chat", str(tiny_dir), "--device", "cpu",
            "--temperature", "0", "--max-tokens", "4"]
    session = tmp_path / "chat.safetensors"

    def chat(*args, stdin=""):
        return subprocess.run(base + list(args), input=stdin, capture_output=True, text=True,
                              timeout=120, env=env)

    r = chat("--session", str(session), "--vram", "1GB", stdin="first message\n/stats\n")
    assert r.returncode == 0, r.stderr
    assert session.is_file() and "session saved" in r.stdout
    assert "cache hit rate" in r.stdout  # --vram offloads experts as in `run`; /stats reports the cache
    ctx1 = int(TURN.search(r.stdout).group(2).replace(",", ""))
    r = chat("--session", str(session), stdin="second message\n")
    assert r.returncode == 0 and "resumed" in r.stdout
    assert int(TURN.search(r.stdout).group(2).replace(",", "")) > ctx1
    session.write_bytes(session.read_bytes()[:-100])  # truncated
    r = chat("--session", str(session))
    assert r.returncode == 1 and "corrupt or truncated" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = chat("--vram", "lots")
    assert r.returncode == 2 and "--vram" in r.stderr


def test_full_terminal_toolbar_completion_markdown(tiny_dir, tiny_model, tmp_path):
    """A real terminal type: live markdown rendering, the bottom toolbar, command completion.
    prompt-toolkit asks the terminal for the cursor position (CPR) before it draws the toolbar."""
    env = dict(os.environ, TERM="xterm-256color", XDG_DATA_HOME=str(tmp_path / "xdg"))
    env.pop("PROMPT_TOOLKIT_NO_CPR", None)
    cmd = ["-m", "kimi_local.cli", "chat", str(tiny_dir), "--device", "cpu", "--temperature", "0",
           "--max-tokens", "8"]
    c = pexpect.spawn(sys.executable, cmd, env=env, encoding="utf-8", timeout=60, dimensions=(30, 120))

    def answer_cpr():
        c.expect_exact("\x1b[6n")
        c.send("\x1b[5;1R")

    answer_cpr()
    c.expect("ctx 0/4,096 │ prefill 0.0 tok/s │ decode 0.0 tok/s")
    c.send("# A heading\x1b\rtext\r")  # Esc-Enter inserts a newline here too
    c.expect(TURN)
    assert int(c.match.group(1)) == len(tiny_model.tokenizer.encode_chat([_user("# A heading\ntext")]))
    ctx = int(c.match.group(2).replace(",", ""))
    answer_cpr()
    c.expect(rf"ctx {ctx}/4,096 │ prefill [\d,.]+ tok/s │ decode [\d,.]+ tok/s")
    c.send("/res")
    c.expect("start a new conversation")  # the completion menu, with each command's help
    c.send("\t\r")
    c.expect("conversation reset")
    answer_cpr()
    c.expect("ctx 0/4,096")
    c.send("\x04")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


# ---- the engine side of the REPL, in-process -----------------------------------------------
def _state(cache):
    return {k: v.clone() for k, v in cache.state_tensors().items()}


def _equal(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conversation_interrupts_and_retry(tiny_model):
    from kimi_local.chat import Conversation, PrefillInterrupted
    from kimi_local.generate import SamplingParams

    conv = Conversation(tiny_model, SamplingParams(temperature=0), 6)
    first = "".join(conv.run_turn(conv.start_turn("hello")))
    before, messages = _state(conv.cache), list(conv.messages)

    def interrupt(done, total):
        raise PrefillInterrupted

    with pytest.raises(PrefillInterrupted):
        list(conv.run_turn(conv.start_turn("dropped"), progress=interrupt))
    assert conv.messages == messages and _equal(_state(conv.cache), before)
    # stop after 2 tokens: the cache holds exactly those, the partial answer is recorded
    pieces = conv.run_turn(conv.start_turn("go on"), stop=lambda: True)
    shown = next(pieces) + "".join(pieces)
    assert conv.interrupted and conv.last.decode_tokens == 1 and conv.messages[-1]["content"] == shown
    assert conv.cache.pos == before["tokens"].numel() + conv.last.prefill_tokens + 1
    # /retry rewinds to the snapshot before that turn and runs it again
    retried = "".join(conv.run_turn(conv.retry_turn()))
    assert len(conv.messages) == len(messages) + 2 and conv.messages[-2]["content"] == "go on"
    again = Conversation(tiny_model, SamplingParams(temperature=0), 6)
    assert "".join(again.run_turn(again.start_turn("hello"))) == first
    assert "".join(again.run_turn(again.start_turn("go on"))) == retried
    assert _equal(_state(again.cache), _state(conv.cache))
    conv.reset()
    assert conv.cache.pos == 0 and conv.messages == []
    assert "".join(conv.run_turn(conv.start_turn("hello"))) == first


def test_conversation_context_overflow(tiny_model):
    from kimi_local.cache import ContextOverflow
    from kimi_local.chat import Conversation
    from kimi_local.generate import SamplingParams

    conv = Conversation(tiny_model, SamplingParams(temperature=0), 4, ctx=48)
    "".join(conv.run_turn(conv.start_turn("hi")))
    before, messages = _state(conv.cache), list(conv.messages)
    with pytest.raises(ContextOverflow, match="tokens"):
        list(conv.run_turn(conv.start_turn("word " * 100)))
    assert conv.messages == messages and _equal(_state(conv.cache), before)
