"""Session files: exact round trip, refusal of other models and of damaged files."""
import json

import pytest
import torch

import kimi_local
from kimi_local.chat import Conversation
from kimi_local.generate import SamplingParams, generate
from kimi_local.session import SessionError, load_session, save_session

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The tiny config with other random weights: same shapes, same file sizes."""
    from kimi_local.tiny import make_checkpoint

    return kimi_local.load(make_checkpoint(tmp_path_factory.mktemp("tiny1") / "ckpt", seed=1), device="cpu")


def _answer(conv: Conversation, text: str) -> str:
    return "".join(conv.run_turn(conv.start_turn(text)))


def _same_state(a, b) -> bool:
    ta, tb = a.state_tensors(), b.state_tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_generate_after_restore_equals_straight_through(tiny_model, tmp_path):
    tok = tiny_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Tell me about recurrent state."}])
    more = tok.encode_chat_continuation([{"role": "user", "content": "Go on."}])
    # straight through: turn 1, then turn 2 on the same cache
    cache = tiny_model.new_cache()
    first = list(generate(tiny_model.net, cache, prompt, GREEDY, 6, tok.stop_ids))
    fed = [] if first[-1] in tok.stop_ids else [tok.im_end_id]
    straight = list(generate(tiny_model.net, cache, fed + more, GREEDY, 12, tok.stop_ids))
    # turn 1, save, restore into a fresh cache, turn 2
    cache = tiny_model.new_cache()
    assert list(generate(tiny_model.net, cache, prompt, GREEDY, 6, tok.stop_ids)) == first
    save_session(tmp_path / "s.safetensors", tiny_model, cache, {"note": "x"})
    restored = tiny_model.new_cache()
    assert load_session(tmp_path / "s.safetensors", tiny_model, restored) == {"note": "x"}
    assert _same_state(cache, restored) and restored.pos == cache.pos
    assert list(generate(tiny_model.net, restored, fed + more, GREEDY, 12, tok.stop_ids)) == straight


def test_conversation_round_trip(tiny_model, tmp_path):
    params = SamplingParams(temperature=0, top_k=7)
    a = Conversation(tiny_model, params, 5, system="Be brief.")
    _answer(a, "Hello!")
    a.save(tmp_path / "chat.safetensors")
    b = Conversation(tiny_model, SamplingParams(), 99)
    b.load(tmp_path / "chat.safetensors")
    assert (b.messages, b.system, b.params, b.max_tokens) == (a.messages, a.system, a.params, a.max_tokens)
    assert _same_state(a.cache, b.cache)
    assert _answer(b, "And then?") == _answer(a, "And then?")
    assert _same_state(a.cache, b.cache)


def test_refuses_another_model(tiny_model, other_model, tmp_path):
    conv = Conversation(tiny_model, GREEDY, 3)
    _answer(conv, "hi")
    conv.save(tmp_path / "s.safetensors")
    with pytest.raises(SessionError, match="another model"):
        load_session(tmp_path / "s.safetensors", other_model, other_model.new_cache())


def test_refuses_damaged_files(tiny_model, tmp_path):
    conv = Conversation(tiny_model, GREEDY, 3)
    _answer(conv, "hi")
    good = tmp_path / "s.safetensors"
    conv.save(good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"\x00" * 64,
        "flipped": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(SessionError, match="corrupt|not a kimi-local"):
            load_session(tmp_path / name, tiny_model, tiny_model.new_cache())
    with pytest.raises(SessionError, match="can't read"):
        load_session(tmp_path / "missing", tiny_model, tiny_model.new_cache())
    # a valid safetensors file that is not a session
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SessionError, match="not a kimi-local session"):
        load_session(tmp_path / "other.safetensors", tiny_model, tiny_model.new_cache())


def test_failed_load_keeps_the_conversation(tiny_model, tmp_path):
    conv = Conversation(tiny_model, GREEDY, 3)
    _answer(conv, "hi")
    before = (list(conv.messages), conv.cache.pos, conv.cache.clone())
    (tmp_path / "bad").write_bytes(b"nope")
    with pytest.raises(SessionError):
        conv.load(tmp_path / "bad")
    assert (conv.messages, conv.cache.pos) == before[:2] and _same_state(conv.cache, before[2])


def test_file_layout_and_atomic_write(tiny_model, tmp_path):
    from safetensors import safe_open

    conv = Conversation(tiny_model, GREEDY, 3)
    _answer(conv, "hi")
    path = tmp_path / "s.safetensors"
    conv.save(path)
    conv.save(path)  # overwrites in place
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temp files left
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        names = set(f.keys())
    assert header["format"] == "kimi-local-state" and header["kind"] == "session"
    meta = json.loads(header["meta"])
    assert meta["messages"][0] == {"role": "user", "content": "hi"} and meta["sampling"]["temperature"] == 0
    assert "tokens" in names and any(n.startswith("kda_state.") for n in names)
    assert any(n.startswith("latent.") for n in names) and any(n.startswith("conv.") for n in names)


def test_context_too_small_for_session(tiny_model, tmp_path):
    conv = Conversation(tiny_model, GREEDY, 3)
    _answer(conv, "hello there, a few tokens")
    conv.save(tmp_path / "s.safetensors")
    small = Conversation(tiny_model, GREEDY, 3, ctx=4)
    with pytest.raises(SessionError, match="context limit"):
        small.load(tmp_path / "s.safetensors")


def _fp8_cache(model):
    """A cache laid out like the GPU engine's --kv-cache fp8 one (fp8 rows + per-row fp32 scales)."""
    c = model.new_cache()
    for i in c.latent:
        c.latent[i] = torch.zeros(c.capacity, c.latent[i].shape[1], dtype=torch.float8_e4m3fn)
    c.latent_scale = {i: torch.ones(c.capacity) for i in c.latent}
    return c


def test_fp8_mla_cache_round_trip(tiny_model, tmp_path):
    src = _fp8_cache(tiny_model)
    n = 5
    src.reserve(n)
    for i in src.latent:
        src.latent[i][:n] = torch.randn(n, src.latent[i].shape[1]).to(torch.float8_e4m3fn)
        src.latent_scale[i][:n] = torch.rand(n) + 0.5
    src.advance(list(range(n)))
    save_session(tmp_path / "fp8.safetensors", tiny_model, src, {})
    dst = _fp8_cache(tiny_model)
    load_session(tmp_path / "fp8.safetensors", tiny_model, dst)
    for i in src.latent:
        assert torch.equal(dst.latent[i][:n].view(torch.uint8), src.latent[i][:n].view(torch.uint8))
        assert torch.equal(dst.latent_scale[i][:n], src.latent_scale[i][:n])
    with pytest.raises(SessionError, match="another MLA cache type"):
        load_session(tmp_path / "fp8.safetensors", tiny_model, tiny_model.new_cache())
