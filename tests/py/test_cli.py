"""Every subcommand parses its arguments the same way (getopt_long):
-h/--help prints its usage on stdout and exits 0, an unknown flag is an
error (exit 2) that names the flag and shows the usage, and a model is
given with -m/--model (info and serve also take it as the one positional
argument). The subcommand list is read from `moed --help`, so a new one is
checked without touching this file."""
import re
import subprocess

import pytest

from conftest import ROOT

MODEL = ROOT / "tests" / "fixtures" / "models" / "qwen2moe.gguf"


def run(moed_bin, *args, timeout=60):
    return subprocess.run([str(moed_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def subcommands(moed_bin):
    out = run(moed_bin, "--help").stdout
    names = re.findall(r"^  (\w+)\s", out.split("commands:", 1)[1], re.M)
    assert {"serve", "info", "generate", "tokenize", "detokenize", "mkmodel", "bench"} <= set(names), out
    return names


@pytest.fixture(scope="module")
def commands(moed_bin):
    return subcommands(moed_bin)


def test_help_on_every_subcommand(moed_bin, commands):
    for cmd in commands:
        for flag in ("-h", "--help"):
            p = run(moed_bin, cmd, flag)
            assert p.returncode == 0, (cmd, flag, p.stderr)
            assert p.stdout.startswith(f"usage: moed {cmd}"), (cmd, flag, p.stdout[:200])
            assert p.stderr == "", (cmd, flag, p.stderr)


def test_unknown_flag_is_a_usage_error(moed_bin, commands):
    for cmd in commands:
        p = run(moed_bin, cmd, "--no-such-flag")
        assert p.returncode == 2, (cmd, p.returncode, p.stderr)
        assert "--no-such-flag" in p.stderr, (cmd, p.stderr)
        # the usage itself, or (serve, whose option list is ~70 lines) where to find it
        assert f"usage: moed {cmd}" in p.stderr or f"moed {cmd} --help" in p.stderr, (cmd, p.stderr)
        assert p.stdout == "", (cmd, p.stdout)


def test_info_takes_dash_m_and_positional(moed_bin):
    a = run(moed_bin, "info", "--no-tensors", "-m", MODEL)
    b = run(moed_bin, "info", "--no-tensors", MODEL)
    c = run(moed_bin, "info", f"--model={MODEL}", "--no-tensors")
    assert a.returncode == 0, a.stderr
    assert "architecture:   qwen2moe" in a.stdout, a.stdout
    assert a.stdout == b.stdout == c.stdout
    # two models, or a stray argument, are refused rather than one ignored
    p = run(moed_bin, "info", "-m", MODEL, MODEL)
    assert p.returncode == 2 and "usage: moed info" in p.stderr, p.stderr
    p = run(moed_bin, "info")
    assert p.returncode == 2 and "usage: moed info" in p.stderr, p.stderr
    p = run(moed_bin, "info", "--check", "-m", MODEL)
    assert p.returncode == 0 and "all finite" in p.stdout, p.stdout + p.stderr


def test_model_commands_take_dash_m(moed_bin):
    t = run(moed_bin, "tokenize", "-m", MODEL, "--ids", "hello world")
    assert t.returncode == 0, t.stderr
    ids = t.stdout.split()
    assert ids and all(i.isdigit() for i in ids), t.stdout
    assert run(moed_bin, "tokenize", "--model", MODEL, "--ids", "hello world").stdout == t.stdout
    d = run(moed_bin, "detokenize", "-m", MODEL, *ids)
    assert d.returncode == 0 and d.stdout.rstrip("\n") == "hello world", (d.stdout, d.stderr)
    g = run(moed_bin, "generate", "-m", MODEL, "--ids", ",".join(ids), "-n", "2")
    assert g.returncode == 0, g.stderr
    assert run(moed_bin, "generate", "--model", MODEL, "--ids", ",".join(ids), "-n", "2").stdout == g.stdout


def test_serve_takes_dash_m_and_positional(moed_bin, tmp_path):
    # a model that does not exist: each form must reach the loader with that
    # path (exit 1, the path named), not stop at the parser (exit 2)
    missing = tmp_path / "absent.gguf"
    for args in (["-m", missing], ["--model", missing], [missing]):
        p = run(moed_bin, "serve", "--port", "0", *args, timeout=60)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        assert str(missing) in p.stderr, (args, p.stderr)


def test_mkmodel_options_parse(moed_bin, tmp_path):
    out = tmp_path / "m.gguf"
    p = run(moed_bin, "mkmodel", "--arch", "qwen2moe", "--layers=2", "--vocab", "300", "--experts", "4",
            "--experts-used", "2", "--rope-base", "5e4", "--seed", "9", "-o", out)
    assert p.returncode == 0, p.stderr
    info = run(moed_bin, "info", "--no-tensors", out).stdout
    assert "n_vocab 300," in info and "n_layer 2\n" in info and "rope: base 50000," in info, info
    assert "experts: 4 routed, 2 used per token" in info, info
    for bad in (["--layers", "x"], ["--rope-base", "-1"], ["--gating", "tanh"], ["stray"]):
        q = run(moed_bin, "mkmodel", "--arch", "qwen2moe", "-o", tmp_path / "n.gguf", *bad)
        assert q.returncode == 2, (bad, q.stderr)
    # the seed decides the weights: same seed, same bytes
    out2 = tmp_path / "m2.gguf"
    run(moed_bin, "mkmodel", "--arch", "qwen2moe", "--layers=2", "--vocab", "300", "--experts", "4",
        "--experts-used", "2", "--rope-base", "5e4", "--seed", "9", "-o", out2)
    assert out.read_bytes() == out2.read_bytes()
