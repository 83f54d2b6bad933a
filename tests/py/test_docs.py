"""The commands in README.md and docs/api.md are true: every `curl` line
and every Python (openai SDK) block runs against a live `moed serve` of the
same demo model `make run` serves, and where a line shows its output in a
trailing `# {...}` comment, that is the output."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from moed_live import Server

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]


def blocks(path, lang):
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def shell_commands(script):
    """[(command, trailing comment or None)] of a shell snippet: newlines inside
    quotes and after a backslash continue a command; '#' at a word start
    outside quotes begins a comment."""
    out, cmd, comment, q, i = [], "", None, None, 0
    while i < len(script):
        ch = script[i]
        if q:
            cmd += ch
            if ch == q:
                q = None
        elif ch in "'\"":
            q = ch
            cmd += ch
        elif ch == "\\" and script[i + 1:i + 2] == "\n":
            cmd += " "
            i += 1
        elif ch == "#" and (not cmd or cmd[-1] in " \t"):
            end = script.find("\n", i)
            end = len(script) if end < 0 else end
            comment = script[i + 1:end].strip()
            i = end
            continue
        elif ch == "\n":
            if cmd.strip():
                out.append((cmd.strip(), comment))
            cmd, comment = "", None
        else:
            cmd += ch
        i += 1
    if cmd.strip():
        out.append((cmd.strip(), comment))
    return out


def curl_commands(path):
    return [(c, e) for b in blocks(path, "sh") for c, e in shell_commands(b) if c.startswith("curl ")]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, moed_bin):
    d = tmp_path_factory.mktemp("docs")
    model = d / "demo-deepseek2-Q8_0.gguf"  # exactly what `make run` makes and serves
    subprocess.run([str(moed_bin), "mkmodel", "--arch", "deepseek2", "--preset", "demo", "--type", "Q8_0",
                    "-o", str(model)], check=True, capture_output=True, timeout=300)
    srv = Server(moed_bin, model, d)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        assert srv.stop(timeout=45) == 0, srv.log()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_curl_examples(doc, demo_server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    cmds = curl_commands(doc)
    assert cmds, f"no curl examples in {doc.name}"
    for raw, expect in cmds:
        cmd = raw.replace("localhost:8080", f"127.0.0.1:{demo_server.port}")
        p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "MOED_API_KEY": "unused"})
        assert p.returncode == 0, (raw, p.stderr)
        out = p.stdout.strip()
        assert out, raw
        if "|" in cmd:
            pass  # a pipeline (grep): its exit status said it found something
        elif out.startswith("data:"):
            assert out.endswith("data: [DONE]"), (raw, out[-300:])
            for ev in out.split("\n\n")[:-1]:
                json.loads(ev[len("data: "):])
        elif out.startswith("# HELP"):
            assert "moed_engine_ready" in out
        else:
            body = json.loads(out)
            documented_error = "temperature" in cmd and "5}" in cmd
            # (a Response object has "error": null)
            assert bool(body.get("error")) == documented_error, (raw, out[:500])
        if expect and expect.startswith("{"):
            shown, _ = json.JSONDecoder().raw_decode(expect)  # '{"status":"ok"} once loaded'
            assert json.loads(out) == shown, (raw, out)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_sdk_examples(doc, demo_server, tmp_path):
    code = "\n".join(b for b in blocks(doc, "python") if "client" in b)
    assert code, f"no SDK example in {doc.name}"
    code = code.replace("localhost:8080", f"127.0.0.1:{demo_server.port}")
    script = tmp_path / "example.py"
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip(), "the examples print their results"


def test_every_serve_option_is_documented(moed_bin):
    # `moed serve --help` is generated from the parser's table; each option
    # must appear in docs/configuration.md (key, flag) and the man page (flag).
    usage = subprocess.run([str(moed_bin), "serve", "--help"], capture_output=True, text=True, timeout=30).stdout
    keys = re.findall(r"\[key (\w+), env MOED_\w+\]", usage)
    assert len(keys) >= 20, usage
    conf = (ROOT / "docs" / "configuration.md").read_text()
    man = (ROOT / "docs" / "moed.1").read_text().replace("\\-", "-")
    for k in keys:
        flag = "--" + k.replace("_", "-")
        assert f"| `{k}` | " in conf and f"`{flag}`" in conf, f"{k} missing from docs/configuration.md"
        assert re.search(rf"\.BI? \"?(-\w, )?{re.escape(flag)}\b", man), f"{flag} missing from docs/moed.1"


def serve_help_options(moed_bin):
    """{key: (flag, default or None when unset, [numbers of its "0 = ..."])}
    from `moed serve --help`, which server/config.c generates from its one
    table (defaults) and engine/engine.h's MOE_DEFAULT_* (what 0 means)."""
    usage = subprocess.run([str(moed_bin), "serve", "--help"], capture_output=True, text=True, timeout=30).stdout
    opts = {}
    for m in re.finditer(r"^ +(?:-\w, )?(--[\w-]+)[^\n]*? (\(default: ([^\n]*)\)|\(required\))\n +\[key (\w+),", usage,
                         re.M):
        flag, default, key = m.group(1), m.group(3), m.group(4)
        line = usage[m.start():m.end()]
        zero = re.search(r"\(0 = ([^)]*)\)", line)
        opts[key] = (flag, default, re.findall(r"\d+", zero.group(1)) if zero else [])
    assert len(opts) >= 20 and len(opts) == len(re.findall(r"\[key \w+,", usage)), usage
    return opts


# Values of the table's defaults; the others ("none", "file name") say what unset means.
UNSET = {"none", "file name", "from the model", None}


def test_defaults_agree_with_serve_help(moed_bin):
    # One fact, one place: each default is defined in server/config.c's table
    # or engine/engine.h; docs/configuration.md, docs/moed.1 and
    # config/moed.conf must quote the same values.
    opts = serve_help_options(moed_bin)
    conf_md = (ROOT / "docs" / "configuration.md").read_text()
    man = (ROOT / "docs" / "moed.1").read_text().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")
    conf = (ROOT / "config" / "moed.conf").read_text()
    checked = 0
    for key, (flag, default, zero) in opts.items():
        row = re.search(rf"^\| `{key}` \| [^|]* \| ([^|]*) \| (.*) \|$", conf_md, re.M)
        assert row, f"{key}: no row in docs/configuration.md"
        doc_default, meaning = row.group(1).replace("`", "").strip(), row.group(2)
        if default in UNSET:
            assert (default or "(required)") in doc_default, (key, default, doc_default)
        else:
            assert doc_default == default, f"{key}: docs/configuration.md says {doc_default}, the table {default}"
        for n in zero:  # what 0 means, from the engine's constants
            assert re.search(rf"\b{n}\b", meaning), f"{key}: docs/configuration.md lacks the engine default {n}"

        entry = re.search(rf'^\.BI? "?(?:-\w, )?{re.escape(flag)}\b[^\n]*\n(.*?)(?=^\.(?:TP|SH|PP))', man, re.M | re.S)
        assert entry, f"{flag} missing from docs/moed.1"
        shown = re.search(r"\(default ([^;:)\s]+)", entry.group(1))
        if shown and default not in UNSET:
            assert shown.group(1) == default, f"{flag}: docs/moed.1 says default {shown.group(1)}, the table {default}"
        for n in zero:
            assert re.search(rf"\b{n}\b", entry.group(1)), f"{flag}: docs/moed.1 lacks the engine default {n}"

        line = re.search(rf"^#?{key} = ?(.*)$", conf, re.M)
        if line is None:
            continue
        if default not in UNSET:
            assert line.group(1).strip() == default, f"{key}: config/moed.conf shows {line.group(1)!r}, the default is {default}"
        block = conf[:line.start()].rsplit("\n\n", 1)[-1]  # the comment above the key
        for n in zero:
            assert re.search(rf"\b{n}\b", block), f"{key}: config/moed.conf's comment lacks the engine default {n}"
        checked += 1
    assert checked >= 24, checked
