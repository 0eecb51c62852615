"""`run --prompt-cache FILE`: the second run with the same document skips its prefill."""
import json

from typer.testing import CliRunner

from kimi_local.cli import app
from kimi_local.generate import SamplingParams, Stats, generate
from kimi_local.session import document_prefix_len, use_prompt_cache

DOC = "Kimi Linear mixes delta-rule attention with latent attention.\n" * 4
GREEDY = SamplingParams(temperature=0)


def _run(tiny_dir, *args, stdin=DOC):
    """`kimi-local run ... --json` in-process (typer's runner): (the JSON answer, stderr)."""
    args = ["run", str(tiny_dir), "-n", "10", "--temperature", "0", "--device", "cpu", "--json", *args]
    r = CliRunner().invoke(app, args, input=stdin)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_second_run_skips_the_document(tiny_dir, tmp_path):
    pc = tmp_path / "doc.kvc"
    plain, _ = _run(tiny_dir, "-p", "Summarise this.")
    first, err1 = _run(tiny_dir, "-p", "Summarise this.", "--prompt-cache", str(pc))
    assert "not used; saved" in err1 and pc.is_file()
    second, err2 = _run(tiny_dir, "-p", "Summarise this.", "--prompt-cache", str(pc))
    assert "prompt cache" in err2 and "used (" in err2
    assert second["prompt_tokens"] < first["prompt_tokens"] // 4  # only the instruction was prefilled
    assert first["text"] == second["text"] == plain["text"]
    # another instruction after the same document still uses the cache
    other, err3 = _run(tiny_dir, "-p", "List the key terms.", "--prompt-cache", str(pc))
    assert "used (" in err3 and other["prompt_tokens"] < first["prompt_tokens"] // 4


def test_mismatch_reprefills_and_rewrites(tiny_model, tmp_path):
    """Another document, another model, a damaged file: prefill everything, rewrite the file."""
    tok, pc = tiny_model.tokenizer, tmp_path / "doc.kvc"

    def attempt(doc, model=tiny_model):
        ids = model.chat_ids(doc + "\n\nSummarise.")
        cache, stats = model.new_cache(), Stats()
        rest, status = use_prompt_cache(model, cache, ids, document_prefix_len(tok, ids, doc), pc, stats)
        answer = list(generate(model.net, cache, rest, GREEDY, 6, tok.stop_ids, stats))
        return status, len(rest), answer

    status, n_rest, answer = attempt(DOC)
    assert status.startswith("not used; saved")
    hit = attempt(DOC)
    assert hit[0].startswith("used (") and hit[1:] == (n_rest, answer)
    status, _, _ = attempt(DOC.replace("latent", "sparse"))  # another document
    assert status.startswith("not used; saved")
    assert attempt(DOC.replace("latent", "sparse"))[0].startswith("used (")
    pc.write_bytes(pc.read_bytes()[:200])  # damaged
    assert attempt(DOC)[0].startswith("not used; saved")
    assert attempt(DOC)[0].startswith("used (")


def test_refused_for_another_model(tiny_model, tmp_path):
    import kimi_local
    from kimi_local.tiny import make_checkpoint

    other = kimi_local.load(make_checkpoint(tmp_path / "tiny1", seed=1), device="cpu")
    pc, doc = tmp_path / "doc.kvc", DOC

    def status(model):
        ids = model.chat_ids(doc + "\n\nSummarise.")
        n = document_prefix_len(model.tokenizer, ids, doc)
        return use_prompt_cache(model, model.new_cache(), ids, n, pc)[1]

    assert status(tiny_model).startswith("not used")
    assert status(other).startswith("not used")  # rewritten for the other model
    assert status(other).startswith("used")
    assert status(tiny_model).startswith("not used")


def test_prompt_cache_without_document_is_ignored(tiny_dir, tmp_path):
    out, err = _run(tiny_dir, "-p", "Hi", "--prompt-cache", str(tmp_path / "x.kvc"), stdin="")
    assert "needs a document" in err and not (tmp_path / "x.kvc").exists() and out["completion_tokens"] >= 1
