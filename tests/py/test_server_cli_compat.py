"""Model ids, other servers' flag spellings, --version / help, and the hints
for unknown flags and MOED_* variables, on the real binary."""
import subprocess

import requests

from server_util import Server, make_model


def run(moed_bin, *args):
    return subprocess.run([str(moed_bin), *args], capture_output=True, text=True, timeout=30)


def test_version_and_help(moed_bin):
    v = run(moed_bin, "--version")
    assert v.returncode == 0 and v.stdout.startswith("moed ")
    sv = run(moed_bin, "serve", "--version")
    assert sv.returncode == 0 and sv.stdout == v.stdout
    h = run(moed_bin, "help", "serve")
    assert h.returncode == 0 and h.stdout == run(moed_bin, "serve", "--help").stdout
    assert "--sse-keepalive" in h.stdout and "-np" in h.stdout
    bad = run(moed_bin, "serve", "--max-seq", "2", "-m", "x.gguf")
    assert bad.returncode == 2 and "did you mean --max-seqs?" in bad.stderr


def test_model_ids_and_flag_aliases(moed_bin, tmp_path):
    model = make_model(moed_bin, tmp_path)
    # llama-server's -np and --alias, vLLM's --max-model-len
    s = Server(moed_bin, model, "--alias", "first,second", "-np", "2", "--max-model-len", "256",
               env={"MOED_CTX_SIZ": "9"}, log_dir=tmp_path).wait_ready()
    try:
        models = requests.get(s.url("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["first"] and models[0]["max_model_len"] == 256
        for ok in ("first", "second", model.stem, model.name):
            assert requests.get(s.url(f"/v1/models/{ok}")).status_code == 200, ok
            r = requests.post(s.url("/v1/completions"), json={"model": ok, "prompt": "x", "max_tokens": 1})
            assert r.status_code == 200, (ok, r.text)
        for bad in ("third", model.stem + ".bin", "First"):
            assert requests.get(s.url(f"/v1/models/{bad}")).status_code == 404, bad
        # -np 2: n up to 2 choices, no more
        body = {"prompt": "x", "max_tokens": 1}
        assert requests.post(s.url("/v1/completions"), json={**body, "n": 2}).status_code == 200
        assert requests.post(s.url("/v1/completions"), json={**body, "n": 3}).json()["error"]["param"] == "n"
    finally:
        assert s.stop() == 0
    assert "ignoring unknown environment variables: MOED_CTX_SIZ (did you mean MOED_CTX_SIZE?)" in s.read_log()
