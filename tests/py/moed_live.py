"""Helpers for tests that run a live `moed serve`: a tiny model, a free
port, start/stop with the output kept for failure messages. Used by
test_deploy.py and test_openapi.py."""
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def make_tiny_model(moed_bin, path, arch="deepseek2"):
    """A few-hundred-kB random-weight model with a real vocabulary and chat template."""
    subprocess.run([str(moed_bin), "mkmodel", "--arch", arch, "--preset", "tiny", "--type", "F16",
                    "-o", str(path)], check=True, capture_output=True, timeout=120)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    """(status, body bytes); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    """`moed serve MODEL --port P [args]` with stdout/stderr in a file."""

    def __init__(self, moed_bin, model, workdir, args=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"moed-serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOED_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [str(moed_bin), "serve", "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_healthy(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"moed serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.url + "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"moed serve not healthy after {timeout} s:\n{self.log()}")

    def stop(self, timeout=60):
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"moed serve ignored SIGTERM for {timeout} s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode
