"""Helpers for the `moed serve` tests: start a live server on a free
loopback port with a tiny random-weight model, wait until /health says
ready, stop it with SIGTERM and collect its log."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import requests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(moed_bin, directory, preset="tiny", arch="deepseek2"):
    path = pathlib.Path(directory) / f"{arch}-{preset}.gguf"
    if not path.exists():
        subprocess.run([str(moed_bin), "mkmodel", "--arch", arch, "--preset", preset, "--type", "F32",
                        "-o", str(path)], check=True, capture_output=True, timeout=120)
    return path


class Server:
    def __init__(self, moed_bin, model, *args, env=None, threads=2, log_dir=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_dir or "/tmp") / f"moed-serve-{self.port}.log"
        # The server tests are about HTTP, not kernels: CPU unless MOED_TEST_DEVICE
        # says otherwise, so their timings do not depend on the host's GPU.
        device = os.environ.get("MOED_TEST_DEVICE", "cpu")
        self.cmd = [str(moed_bin), "serve", "-m", str(model), "--port", str(self.port), "-t", str(threads),
                    "--device", device, *args]
        e = {k: v for k, v in os.environ.items() if not k.startswith("MOED_")}
        e.update(env or {})
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=e)

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moed serve exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"moed serve not ready in {timeout}s:\n{self.read_log()}")

    def read_log(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def url(self, path):
        return self.base + path

    def metrics(self):
        return parse_prometheus(requests.get(self.url("/metrics"), timeout=10).text)

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def parse_prometheus(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}; checks
    that every sample line is well formed and every metric has a TYPE."""
    out, types = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            assert typ in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = typ
            continue
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        v = float(value)
        if "{" in head:
            name, _, rest = head.partition("{")
            assert rest.endswith("}"), line
            labels = []
            for part in rest[:-1].split(","):
                k, _, val = part.partition("=")
                assert val.startswith('"') and val.endswith('"'), line
                labels.append((k, val[1:-1]))
        else:
            name, labels = head, []
        base = name
        for suf in ("_bucket", "_sum", "_count"):
            if name.endswith(suf) and name[: -len(suf)] in types:
                base = name[: -len(suf)]
        assert base in types, f"no TYPE for {name}"
        out[(name, frozenset(labels))] = v
    return out


def metric(m, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for (n, ls), v in m.items():
        if n == name and all((k, str(val)) in ls for k, val in labels.items()):
            total += v
            found = True
    assert found, f"metric {name} {labels} missing"
    return total


def sse_events(resp):
    """Yields the JSON payloads of an SSE response ('[DONE]' as the string);
    comment lines (': keep-alive') are skipped, as SSE clients do."""
    for raw in resp.iter_lines():
        if not raw or raw.startswith(b":"):
            continue
        line = raw.decode()
        assert line.startswith("data: "), line
        data = line[6:]
        yield data if data == "[DONE]" else json.loads(data)
