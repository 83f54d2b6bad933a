"""Signals and the model file under `moed serve`: SIGHUP reloads the live
settings and never kills; SIGHUP and SIGTERM are handled while the model
is still loading; model paths that are not regular files are refused at
once; a served file that shrinks in place ends in a logged exit 3."""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import requests

from server_util import Server, make_model


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


def wait_log(s, text, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in s.read_log():
            return
        assert s.proc.poll() is None, f"moed exited with {s.proc.returncode}:\n{s.read_log()}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout}s:\n{s.read_log()}")


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_sighup_reloads_settings(moed_bin, model, tmp_path):
    conf = tmp_path / "moed.conf"
    conf.write_text("api_key = old-key\nlog_level = info\n")
    s = Server(moed_bin, model, "--config", str(conf), log_dir=tmp_path).wait_ready()
    try:
        models = s.url("/v1/models")
        assert requests.get(models, headers=auth("old-key")).status_code == 200
        assert requests.get(models, headers=auth("new-key")).status_code == 401

        # a new key and debug level: the old key is refused, /health is logged
        conf.write_text("api_key = new-key\nlog_level = debug\nctx_size = 300\n")
        s.proc.send_signal(signal.SIGHUP)
        wait_log(s, "reloaded settings: api_key, log_level")
        wait_log(s, "need a restart were not applied: ctx_size")
        assert requests.get(models, headers=auth("new-key")).status_code == 200
        assert requests.get(models, headers=auth("old-key")).status_code == 401
        assert requests.get(s.url("/health")).status_code == 200
        wait_log(s, "GET /health status=200")  # info-level /health lines only show at debug

        # a bad file: logged, nothing changes
        conf.write_text("api_key = third-key\nlog_level = loud\n")
        s.proc.send_signal(signal.SIGHUP)
        wait_log(s, "reload failed, keeping the current settings")
        assert "log_level: 'loud'" in s.read_log()
        assert requests.get(models, headers=auth("new-key")).status_code == 200
        assert requests.get(models, headers=auth("third-key")).status_code == 401

        # warn level: a successful request no longer writes a line
        conf.write_text("api_key = new-key\nlog_level = warn\n")
        n_before = s.read_log().count("GET /v1/models")
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # nothing to wait for in the log: warn hides the "reloaded" line too
        assert requests.get(models, headers=auth("new-key")).status_code == 200
        assert requests.get(models, headers=auth("wrong")).status_code == 401  # 4xx still logged at info: hidden
        time.sleep(0.2)
        assert s.read_log().count("GET /v1/models") == n_before, s.read_log()
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0, s.read_log()


def test_signals_while_loading(moed_bin, model, tmp_path):
    """The engine thread is held inside the load by the service manager's
    notification socket: its queue is filled so that moed's first status
    message fits and the engine's next ("loading: mapping") blocks until
    the test reads. Meanwhile SIGHUP must reload and SIGTERM must end in
    a clean exit once the load can finish."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    n = 0
    try:
        while True:
            filler.sendto(b"X=1", path)
            n += 1
    except BlockingIOError:
        pass
    sock.recv(64)  # room for exactly one message
    s = Server(moed_bin, model, env={"NOTIFY_SOCKET": path}, log_dir=tmp_path)
    try:
        wait_log(s, "listening on")
        r = requests.get(s.url("/health"), timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        s.proc.send_signal(signal.SIGHUP)
        wait_log(s, "reloaded settings: none changed")
        r = requests.get(s.url("/health"), timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "loading"  # still loading, still alive
        s.proc.send_signal(signal.SIGTERM)
        wait_log(s, "received SIGTERM")
        assert "serving" not in s.read_log()
        sock.setblocking(False)
        deadline = time.time() + 30
        while s.proc.poll() is None and time.time() < deadline:
            try:
                sock.recv(4096)
            except BlockingIOError:
                time.sleep(0.02)
        assert s.proc.wait(timeout=5) == 0, s.read_log()
    finally:
        s.stop()
        sock.close()
        filler.close()
    log = s.read_log()
    # the engine logs "loading: mapping" only after its blocked notification went out
    assert log.index("reloaded settings") < log.index("received SIGTERM") < log.index("loading: mapping"), log
    assert "serving" not in log and "drained; stopping" in log, log
    print(f"notify queue held {n} messages")


@pytest.fixture
def special_files(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    d = tmp_path / "dir.gguf"
    d.mkdir()
    return [(fifo, "FIFO"), (d, "directory"), ("/dev/zero", "character device")]


def test_info_refuses_non_regular_files(moed_bin, special_files):
    for path, kind in special_files:
        r = subprocess.run([moed_bin, "info", str(path)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 1, (path, r.stderr)
        assert f"{path}': not a regular file ({kind})" in r.stderr, r.stderr


def test_serve_refuses_non_regular_files(moed_bin, special_files, tmp_path):
    for path, kind in special_files:
        s = Server(moed_bin, path, log_dir=tmp_path)
        try:
            assert s.proc.wait(timeout=20) == 1
        finally:
            s.stop()
        assert f"{path}': not a regular file ({kind})" in s.read_log(), s.read_log()


def test_model_truncated_in_place_exits_3(moed_bin, model, tmp_path):
    served = tmp_path / "served.gguf"
    shutil.copy(model, served)
    s = Server(moed_bin, served, log_dir=tmp_path).wait_ready()
    try:
        # what `cp new.gguf served.gguf` does first: the same inode, cut short
        with open(served, "r+b") as f:
            f.truncate(4096)
        with pytest.raises(requests.ConnectionError):
            requests.post(s.url("/v1/completions"), json={"prompt": "hello", "max_tokens": 2}, timeout=30)
        assert s.proc.wait(timeout=20) == 3
    finally:
        s.stop()
    lines = [ln for ln in s.read_log().splitlines() if " error " in ln and "shrank" in ln]
    assert len(lines) == 1 and lines[0].endswith(f" file={served}"), s.read_log()


def test_other_sigbus_still_kills(moed_bin, model, tmp_path):
    """Only a fault inside the model mapping is turned into exit 3; any
    other SIGBUS (here one sent with kill) keeps its default action."""
    s = Server(moed_bin, model, log_dir=tmp_path).wait_ready()
    try:
        s.proc.send_signal(signal.SIGBUS)
        assert s.proc.wait(timeout=20) == -signal.SIGBUS
    finally:
        s.stop()
    assert "shrank" not in s.read_log()
