"""`kimi-local run` and `kimi-local demo` end to end, as subprocesses."""
import json
import os
import subprocess
import sys

import pytest


def _run(args, stdin=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "kimi_local.cli", *args], input=stdin,
                          capture_output=True, timeout=300, env=e)


def test_run_piped_document(tiny_dir):
    r = _run(["run", str(tiny_dir), "-p", "Summarise this.", "-n", "12", "--temperature", "0", "--device", "cpu"],
             stdin="A long document about recurrent state.\n".encode() * 20)
    assert r.returncode == 0, r.stderr.decode()
    assert "decode" in r.stderr.decode() and "tok/s" in r.stderr.decode()
    # greedy is deterministic: the same command gives the same text
    r2 = _run(["run", str(tiny_dir), "-p", "Summarise this.", "-n", "12", "--temperature", "0", "--device", "cpu"],
              stdin="A long document about recurrent state.\n".encode() * 20)
    assert r2.stdout == r.stdout


def test_run_json_and_document_changes_answer(tiny_dir):
    base = ["run", str(tiny_dir), "-p", "Hi", "-n", "8", "--temperature", "0", "--device", "cpu", "--json"]
    a = json.loads(_run(base, stdin=b"").stdout)
    b = json.loads(_run(base, stdin=b"some document").stdout)
    assert a["completion_tokens"] >= 1 and a["prompt_tokens"] < b["prompt_tokens"]
    assert set(a) >= {"text", "prompt_tokens", "completion_tokens", "prefill_tok_s", "decode_tok_s"}


def test_run_usage_errors(tiny_dir, tmp_path):
    r = _run(["run", str(tiny_dir)], stdin=b"")
    assert r.returncode == 2 and b"prompt" in r.stderr
    r = _run(["run", str(tmp_path / "missing"), "-p", "x"], stdin=b"")
    assert r.returncode == 1 and b"no such file" in r.stderr
    r = _run(["run", str(tiny_dir), "-p", "x", "--top-p", "0"], stdin=b"")
    assert r.returncode == 2


def test_run_invalid_utf8_and_overflow(tiny_dir):
    r = _run(["run", str(tiny_dir), "-p", "x", "-n", "2", "--device", "cpu"], stdin=b"caf\xe9 \xff text")
    assert r.returncode == 0 and b"not valid UTF-8" in r.stderr
    r = _run(["run", str(tiny_dir), "-p", "x", "--ctx", "64", "--device", "cpu"], stdin=b"word " * 500)
    assert r.returncode == 1 and b"tokens too long" in r.stderr


@pytest.mark.slow
def test_demo(tmp_path):
    r = _run(["demo", "--device", "cpu"], env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "demo ok" in out and "prefilled only the" in out and "piped document" in out


def test_bench_tiny_cpu_json_with_decode_variants(tiny_dir):
    """`kimi-local bench` on the tiny model on the CPU: JSON rows for each depth, prompt and --pdl-ab variant."""
    r = _run(["bench", str(tiny_dir), "--device", "cpu", "--contexts", "16,40", "--prompts", "24",
              "--decode-tokens", "2", "--chunk", "8", "--pdl-ab", "--json"])
    assert r.returncode == 0, r.stderr.decode()
    rows = json.loads(r.stdout)["rows"]
    dec = [x for x in rows if x["kind"] == "decode"]
    assert [(x["ctx"], x["note"]) for x in dec] == [(c, v) for c in (16, 40) for v in ("pdl+prefetch", "pdl", "no pdl")]
    assert all(x["tok_s"] > 0 for x in dec)
    pre = [x for x in rows if x["kind"] == "prefill"]
    assert len(pre) == 1 and pre[0]["ctx"] == 24 and pre[0]["chunk"] == 8 and pre[0]["tok_s"] > 0
    # --chunk auto (default): the model's own chunk, reported
    r = _run(["bench", str(tiny_dir), "--device", "cpu", "--contexts", "16", "--prompts", "24", "--decode-tokens", "1",
              "--json"])
    assert r.returncode == 0, r.stderr.decode()
    pre = [x for x in json.loads(r.stdout)["rows"] if x["kind"] == "prefill"]
    assert pre[0]["chunk"] == 2048 and pre[0]["tok_s"] > 0  # the CPU reference's chunk


def test_bench_variant_option(tiny_dir):
    """--variant VAR=value[;VAR=value]: the default environment first, then each variant, per depth; a malformed
    one is a usage error before anything loads."""
    from kimi_local.bench import parse_variants

    assert parse_variants(["KIMI_LOCAL_PREFETCH_NEXT=kda,mla; KIMI_LOCAL_X8=0"]) == [
        ("default", {}), ("KIMI_LOCAL_PREFETCH_NEXT=kda,mla; KIMI_LOCAL_X8=0",
                          {"KIMI_LOCAL_PREFETCH_NEXT": "kda,mla", "KIMI_LOCAL_X8": "0"})]
    r = _run(["bench", str(tiny_dir), "--device", "cpu", "--contexts", "16", "--prompts", "24", "--decode-tokens", "1",
              "--chunk", "8", "--variant", "KIMI_LOCAL_NORM_ROUTE=0", "--json"])
    assert r.returncode == 0, r.stderr.decode()
    rows = json.loads(r.stdout)["rows"]
    dec = [x for x in rows if x["kind"] == "decode"]
    assert [x.get("note") for x in dec] == ["default", "KIMI_LOCAL_NORM_ROUTE=0"] and all(x["tok_s"] > 0 for x in dec)
    pre = [x for x in rows if x["kind"] == "prefill"]  # each prompt under each variant too
    assert [(x["ctx"], x.get("note")) for x in pre] == [(24, "default"), (24, "KIMI_LOCAL_NORM_ROUTE=0")]
    assert all(x["tok_s"] > 0 for x in pre)
    r = _run(["bench", str(tiny_dir), "--device", "cpu", "--variant", "X8", "--json"])
    assert r.returncode == 2 and "VAR=value" in r.stderr.decode()


def test_text_table_alignment_and_cells():
    from kimi_local.bench import text_table

    out = text_table([{"a": 1.23456, "ok": False, "note": "x" * 150}, {"a": None, "ok": True, "b": "long value"}],
                     ["a", "b", "ok", "note"], {"a": "{:.2f}"})
    lines = out.split("\n")
    assert lines[0] == "" and lines[1].split(" | ")[:3] == ["a   ", "b         ", "ok  "]
    assert lines[3].startswith("1.23 |            | FAIL | " + "x" * 100) and "x" * 101 not in out
    assert lines[4].startswith("     | long value | ok   |")
    assert len({len(x) for x in lines[1:]}) == 1  # every row as wide as the header
