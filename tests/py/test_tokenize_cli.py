"""`moed tokenize` / `moed detokenize` against the committed tokenizer fixtures.

The expected ids are the reference tokenizers' (tests/fixtures/tokenizer/*.tok.txt,
written by tests/gen_tokenizer_fixtures.py from HF tokenizers / sentencepiece).
"""
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "tokenizer"


def cases(family):
    """(text, ids with special parsing, ids without) for valid, NUL-free, non-empty inputs."""
    out = []
    for line in (FIX / f"{family}.tok.txt").read_text().splitlines():
        col = line.split("\t")
        raw = bytes.fromhex(col[0])
        if len(col) > 4 or not raw or b"\0" in raw or raw.startswith(b"-"):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append((text, col[1], col[2]))
    return out


def run(moed_bin, *args, input=None):
    return subprocess.run([str(moed_bin), *args], capture_output=True, input=input, timeout=60)


@pytest.mark.parametrize("family", ["deepseek2", "qwen2", "mistral"])
def test_tokenize_ids_match_reference(moed_bin, family):
    model = str(FIX / f"{family}.gguf")
    picked = cases(family)[::20]
    assert len(picked) > 10
    for text, ids_sp, ids_plain in picked:
        r = run(moed_bin, "tokenize", "-m", model, "--ids", text)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == ids_plain, text
        r = run(moed_bin, "tokenize", "-m", model, "--ids", "--special", text)
        assert r.stdout.decode().strip() == ids_sp, text


def test_tokenize_file_and_listing(moed_bin, tmp_path):
    model = str(FIX / "qwen2.gguf")
    text = "Hello world\n你好 😀"
    f = tmp_path / "in.txt"
    f.write_bytes(text.encode())
    by_arg = run(moed_bin, "tokenize", "-m", model, "--ids", text).stdout
    assert run(moed_bin, "tokenize", "-m", model, "--ids", "-f", str(f)).stdout == by_arg
    assert run(moed_bin, "tokenize", "-m", model, "--ids", "-f", "-", input=text.encode()).stdout == by_arg
    # the listing shows one token per line: id, vocabulary string, piece
    lines = run(moed_bin, "tokenize", "-m", model, text).stdout.decode().splitlines()
    assert len(lines) == len(by_arg.split())
    assert lines[0].split()[0] == by_arg.split()[0].decode()
    assert "'Hello'" in lines[0]


def test_detokenize_round_trip(moed_bin):
    for family in ["deepseek3", "llama3", "mistral"]:
        model = str(FIX / f"{family}.gguf")
        for text, _, ids_plain in cases(family)[::25]:
            if "\u2581" in text or "\r" in text or not ids_plain:  # SPM reads U+2581 as a space
                continue
            r = run(moed_bin, "detokenize", "-m", model, *ids_plain.split())
            assert r.returncode == 0, r.stderr
            assert r.stdout.decode("utf-8")[:-1] == text  # the CLI ends with a newline


def test_bos_and_special_rendering(moed_bin):
    model = str(FIX / "deepseek2.gguf")
    r = run(moed_bin, "tokenize", "-m", model, "--ids", "--bos", "Hi")
    assert r.stdout.decode().split()[0] == "100000"
    assert run(moed_bin, "detokenize", "-m", model, "100000", "11007").stdout.decode() == "Hi\n"
    r = run(moed_bin, "detokenize", "-m", model, "--special", "100000", "11007")
    assert r.stdout.decode() == "<｜begin▁of▁sentence｜>Hi\n"


def test_cli_errors(moed_bin):
    model = str(FIX / "qwen2.gguf")
    assert run(moed_bin, "tokenize", "-m", model).returncode == 2
    assert run(moed_bin, "tokenize", "--ids", "x").returncode == 2
    assert run(moed_bin, "detokenize", "-m", model, "abc").returncode == 2
    r = run(moed_bin, "detokenize", "-m", model, "99999999")
    assert r.returncode == 2 and b"out of range" in r.stderr
    r = run(moed_bin, "tokenize", "-m", "/nonexistent.gguf", "x")
    assert r.returncode == 1 and r.stderr
