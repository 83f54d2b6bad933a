"""Deployment: the systemd unit verifies and keeps its sandbox, `make
install`/`make uninstall` put exactly the expected files in place and take
them away again, `moed serve` speaks the sd_notify protocol systemd's
Type=notify needs (STATUS while loading, READY=1, WATCHDOG=1, STOPPING=1
on SIGTERM, exit 0), and the Kubernetes manifests probe /health on the
port the server listens on."""
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import kubernetes_validate as kv
import pytest
import yaml

from moed_live import Server, free_port, http_get, make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "moed.service"
K8S = ROOT / "deploy" / "k8s"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
need_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def unit_settings(text):
    """[Service] settings as {key: [values]} (systemd keys may repeat)."""
    out = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        k, _, v = line.partition("=")
        out.setdefault((section, k.strip()), []).append(v.strip())
    return out


def seconds(v):
    m = re.fullmatch(r"(\d+)(s|min)?", v)
    assert m, v
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def man_dir(tmp_path):
    """A MANPATH holding moed(1), so verify's Documentation=man:moed(1) check passes."""
    d = tmp_path / "man"
    (d / "man1").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "moed.1", d / "man1" / "moed.1")
    return d


def analyze(*args, env_extra=None):
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", **(env_extra or {}))
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env=env)


# --- the unit ---------------------------------------------------------------

@need_analyze
def test_unit_verifies_clean(tmp_path, moed_bin):
    # verify checks that ExecStart's binary exists: point it at the built one.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/moed ", f"ExecStart={moed_bin} ")
    assert str(moed_bin) in text
    unit = tmp_path / "moed.service"
    unit.write_text(text)
    p = analyze("verify", str(unit), env_extra={"MANPATH": str(man_dir(tmp_path))})
    assert p.returncode == 0 and p.stderr.strip() == "" and p.stdout.strip() == "", p.stdout + p.stderr


@need_analyze
def test_unit_sandbox_exposure_is_low(tmp_path, moed_bin):
    # systemd's own score (0 = locked down, 10 = wide open); 2.0 keeps every
    # hardening setting the unit has today - dropping one pushes it over.
    unit = tmp_path / "moed.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/moed ", f"ExecStart={moed_bin} "))
    p = analyze("security", "--offline=true", "--threshold=20", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for moed.service: ([\d.]+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0 and p.returncode == 0, p.stdout[-3000:]


def test_unit_lifecycle_settings():
    s = unit_settings(UNIT.read_text())
    get = lambda k: s.get(("[Service]", k), [None])[-1]  # noqa: E731
    assert get("Type") == "notify" and get("NotifyAccess") == "main"
    assert get("KillSignal") == "SIGTERM"
    assert get("ExecStart").startswith("/usr/local/bin/moed serve --config /etc/moed/moed.conf")
    assert get("EnvironmentFile") == "-/etc/moed/moed.env"
    assert get("ExecReload") == "kill -HUP $MAINPID"  # moed reloads its live settings on SIGHUP
    # systemd must outwait the server's drain (drain_timeout, 30 s by default)
    # with room to free the model, and allow minutes for a big load.
    conf_default = 30
    assert seconds(get("TimeoutStopSec")) >= conf_default + 30
    assert seconds(get("TimeoutStartSec")) >= 600
    assert 10 <= seconds(get("WatchdogSec")) <= 300
    # the sandbox must not hide the GPU: no private /dev, NVIDIA majors allowed
    assert get("PrivateDevices") in (None, "no", "false")
    allowed = " ".join(s[("[Service]", "DeviceAllow")])
    for dev in ("char-nvidia-frontend", "char-nvidiactl", "char-nvidia-uvm"):
        assert f"{dev} rw" in allowed
    assert get("DevicePolicy") == "closed"
    assert get("ProcSubset") in (None, "all")  # libcuda reads /proc/driver/nvidia
    assert get("CapabilityBoundingSet") == ""
    for k, v in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                 ("PrivateTmp", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectControlGroups", "yes"),
                 ("RestrictNamespaces", "yes"), ("LockPersonality", "yes"),
                 ("SystemCallArchitectures", "native"), ("DynamicUser", "yes")]:
        assert get(k) == v, k
    assert get("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_env_file_names_real_options(moed_bin):
    # Every MOED_* the example env file mentions is an option `moed serve` knows.
    names = re.findall(r"^#?(MOED_[A-Z_]+)=", (ROOT / "deploy" / "moed.env").read_text(), re.M)
    assert names
    usage = subprocess.run([str(moed_bin), "serve", "--help"], capture_output=True, text=True, timeout=30)
    for n in names:
        assert f"env {n}]" in usage.stdout + usage.stderr, n


# --- make install / uninstall ---------------------------------------------------

def make(build_dir, *args):
    bin_path = build_dir / "moed"
    # -o: install what is built; never rebuild from inside a test.
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"BUILD={build_dir}", "-o", str(bin_path),
                           *args], capture_output=True, text=True, timeout=120)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_install_uninstall(tmp_path, build_dir, moed_bin):
    dest = tmp_path / "dest"
    p = make(build_dir, "install", "PREFIX=/usr", f"DESTDIR={dest}")
    assert p.returncode == 0, p.stdout + p.stderr
    docs = sorted(f"usr/share/doc/moed/{f.name}" for f in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md",
                                                          ROOT / "docs" / "openapi.yaml"])
    expect = sorted([
        "etc/moed/moed.conf", "etc/moed/moed.env", "usr/bin/moed", "usr/lib/systemd/system/moed.service",
        "usr/share/man/man1/moed.1", "usr/share/moed/moed.conf.example", "usr/share/moed/moed.env.example",
        *docs])
    assert tree(dest) == expect

    assert (dest / "usr/bin/moed").read_bytes() == moed_bin.read_bytes()
    assert os.access(dest / "usr/bin/moed", os.X_OK)
    assert (dest / "etc/moed/moed.conf").read_text() == (ROOT / "config/moed.conf").read_text()
    assert (dest / "etc/moed/moed.env").stat().st_mode & 0o777 == 0o600  # may hold API keys
    unit = (dest / "usr/lib/systemd/system/moed.service").read_text()
    # the installed unit runs the installed binary; nothing else changed
    assert unit == UNIT.read_text().replace("ExecStart=/usr/local/bin/moed ", "ExecStart=/usr/bin/moed ")
    if SYSTEMD_ANALYZE:
        # verify the installed unit against the installed binary and man page
        staged = tmp_path / "staged" / "moed.service"
        staged.parent.mkdir()
        staged.write_text(unit.replace("ExecStart=/usr/bin/moed ", f"ExecStart={dest}/usr/bin/moed "))
        q = analyze("verify", str(staged), env_extra={"MANPATH": str(dest / "usr/share/man")})
        assert q.returncode == 0 and not q.stderr.strip(), q.stdout + q.stderr

    # A second install keeps the admin's edited config.
    (dest / "etc/moed/moed.conf").write_text("model = /srv/m.gguf\n")
    p = make(build_dir, "install", "PREFIX=/usr", f"DESTDIR={dest}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (dest / "etc/moed/moed.conf").read_text() == "model = /srv/m.gguf\n"

    # Uninstall keeps the edited config and removes everything else.
    p = make(build_dir, "uninstall", "PREFIX=/usr", f"DESTDIR={dest}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert tree(dest) == ["etc/moed/moed.conf"]
    (dest / "etc/moed/moed.conf").unlink()

    # Install + uninstall with nothing edited leaves no file and no moed directory.
    p = make(build_dir, "install", "PREFIX=/usr/local", f"DESTDIR={dest}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ExecStart=/usr/local/bin/moed " in (dest / "usr/local/lib/systemd/system/moed.service").read_text()
    p = make(build_dir, "uninstall", "PREFIX=/usr/local", f"DESTDIR={dest}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert tree(dest) == []
    assert not [d for d in dest.rglob("*") if "moed" in d.name]


# --- sd_notify --------------------------------------------------------------------

class NotifyListener:
    """The systemd side of sd_notify: an AF_UNIX datagram socket; every
    datagram is one message of NEWLINE-separated KEY=VALUE assignments."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, [assignments])
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def assignments(self):
        with self.lock:
            return [a for _, m in self.messages for a in m if a]

    def wait_for(self, assignment, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if assignment in self.assignments():
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def test_sd_notify_protocol(tmp_path, moed_bin):
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    listener = NotifyListener(tmp_path / "notify.sock")
    # WATCHDOG_USEC as systemd sets it for WatchdogSec=1s: the server must
    # then send WATCHDOG=1 at least every half second while it runs.
    srv = Server(moed_bin, model, tmp_path,
                 env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"})
    try:
        assert listener.wait_for("READY=1", 60), f"no READY=1: {listener.assignments()}\n{srv.log()}"
        msgs = listener.assignments()
        ready_at = msgs.index("READY=1")
        # progress was reported while loading, before READY
        assert any(a.startswith("STATUS=") for a in msgs[:ready_at]), msgs
        # READY means the socket already accepts requests
        status, body = http_get(srv.url + "/health")
        assert status == 200, body

        n0 = listener.assignments().count("WATCHDOG=1")
        time.sleep(2.0)
        n1 = listener.assignments().count("WATCHDOG=1")
        assert n1 - n0 >= 2, f"{n1 - n0} WATCHDOG=1 in 2 s with WATCHDOG_USEC=1000000"
        assert "STOPPING=1" not in listener.assignments()

        srv.proc.send_signal(signal.SIGTERM)
        assert listener.wait_for("STOPPING=1", 10), f"no STOPPING=1 after SIGTERM: {listener.assignments()}"
        assert srv.stop(timeout=45) == 0, srv.log()
        msgs = listener.assignments()
        assert msgs.index("STOPPING=1") > msgs.index("READY=1")
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        listener.close()


def test_no_notify_socket_is_fine(tmp_path, moed_bin):
    # Outside systemd nothing is sent and nothing breaks: serve, SIGTERM, exit 0.
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    srv = Server(moed_bin, model, tmp_path)
    try:
        srv.wait_healthy()
    finally:
        assert srv.stop(timeout=45) == 0, srv.log()


# --- Kubernetes ---------------------------------------------------------------

def k8s_docs():
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def test_k8s_manifests_consistent():
    docs = k8s_docs()
    deployments = [(n, d) for n, d in docs if d["kind"] == "Deployment"]
    services = [d for _, d in docs if d["kind"] == "Service"]
    assert deployments and services
    gpu = 0
    for name, d in deployments:
        assert d["apiVersion"] == "apps/v1"
        spec = d["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
        (c,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "moed"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        # listens on all interfaces on the declared port (the default is loopback)
        assert env.get("MOED_HOST") == "0.0.0.0"
        assert int(env["MOED_PORT"]) == ports["http"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            g = c[probe]["httpGet"]
            assert g["path"] == "/health" and g["port"] in ("http", ports["http"]), (name, probe)
        # the pod gets SIGTERM and the drain runs before the kill
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > float(env.get("MOED_DRAIN_TIMEOUT") or 30)
        # every replica behind the Service must be routable
        assert any(all(labels.get(k) == v for k, v in s["spec"]["selector"].items()) for s in services)
        limits = c["resources"].get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu += 1
            assert env.get("MOED_DEVICE") == "cuda"
    assert gpu >= 1, "a GPU variant requesting nvidia.com/gpu"
    for s in services:
        assert any(p["targetPort"] == "http" for p in s["spec"]["ports"])



# --- container image ------------------------------------------------------------

def test_dockerfile_runtime_libraries_cover_the_binary(moed_bin):
    # Every shared library the binary links directly must come from a package
    # the runtime stage installs (versions and Ubuntu's t64 suffix aside), so a
    # new dependency (e.g. ICU) cannot be forgotten there.
    readelf, dpkg = shutil.which("readelf"), shutil.which("dpkg")
    if not readelf or not dpkg:
        pytest.skip("needs readelf and dpkg")
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    runtime = text[text.rindex("FROM "):]
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", subprocess.run([readelf, "-d", str(moed_bin)], capture_output=True,
                                                                  text=True, check=True).stdout)
    assert needed
    for lib in needed:
        if re.match(r"lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so|ld-linux|libcu", lib):
            continue  # the C/C++ runtime is in every base image; CUDA's in the nvidia/cuda one
        p = subprocess.run([dpkg, "-S", lib], capture_output=True, text=True)
        assert p.returncode == 0, f"{lib}: {p.stderr}"
        pkg = p.stdout.split(":")[0].strip()
        stem = re.sub(r"(t64)?$", "", pkg)
        stem = re.sub(r"\d+$", "", stem) if pkg.startswith("libicu") else stem
        assert stem in runtime, f"{lib} (package {pkg}) is not installed by the Dockerfile's runtime stage"


# --- the unit's system-call filter against what moed really calls --------------

def syscall_groups():
    """{'@group': {syscalls}} with nested groups expanded, from systemd-analyze."""
    out = analyze("syscall-filter", "--no-pager").stdout
    groups, cur = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = line.strip()
            groups[cur] = []
        elif line.startswith("    ") and cur and not line.strip().startswith("#"):
            groups[cur].append(line.strip())

    def expand(name):
        return set().union(*[expand(x) if x.startswith("@") else {x} for x in groups[name]])

    return expand


def unit_syscall_allow_set(expand):
    allow, deny = set(), set()
    for v in unit_settings(UNIT.read_text())[("[Service]", "SystemCallFilter")]:
        target = deny if v.startswith("~") else allow
        for item in v.lstrip("~").split():
            target |= expand(item) if item.startswith("@") else {item}
    return allow - deny


@need_analyze
def test_syscall_filter_covers_what_moed_serve_calls(tmp_path, moed_bin):
    # strace a real serve: load, a streamed chat, /metrics, SIGTERM drain.
    # Every system call it makes must pass the unit's SystemCallFilter, or
    # under systemd it would fail with EPERM. (The CPU path only: the CUDA
    # driver's calls can only be seen on a GPU host.)
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    trace = tmp_path / "strace.out"
    port = free_port()
    proc = subprocess.Popen([strace, "-f", "-qq", "-o", str(trace), str(moed_bin), "serve", "-m", str(model),
                             "--port", str(port), "--threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http_get(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                if "ptrace" in proc.stderr.read():
                    pytest.skip("ptrace is not permitted here")
                raise AssertionError("moed serve under strace exited")
            time.sleep(0.1)
        import urllib.request
        body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true}'
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=body), timeout=30) as r:
            assert b"[DONE]" in r.read()
        assert http_get(url + "/metrics")[0] == 200
        # SIGTERM to moed itself (strace's child), then let strace finish
        child = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(child, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert {"epoll_wait", "accept4", "mmap", "futex"} <= used, sorted(used)
    allowed = unit_syscall_allow_set(syscall_groups())
    assert not used - allowed, f"blocked by the unit's SystemCallFilter: {sorted(used - allowed)}"



# --- MemoryDenyWriteExecute=yes: moed works under the kernel's W^X ---------------

def _set_mdwe():
    """preexec_fn: the kernel's W^X for this process and what it execs
    (prctl PR_SET_MDWE, Linux >= 6.3), as systemd >= 254 applies it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        os._exit(97)


def test_serves_under_memory_deny_write_execute(tmp_path, moed_bin):
    # The unit sets MemoryDenyWriteExecute=yes. PCRE2's JIT wants RWX pages
    # and is refused; the tokenizer must fall back to the interpreter and give
    # the same tokens, and the whole serve path must work.
    probe = subprocess.run(["true"], preexec_fn=_set_mdwe)
    if probe.returncode == 97:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    text = "Hello world, it's 2026: ünïcödé and 12345 digits!"
    plain = subprocess.run([str(moed_bin), "tokenize", "--ids", "-m", str(model), text],
                           capture_output=True, text=True, timeout=60)
    wx = subprocess.run([str(moed_bin), "tokenize", "--ids", "-m", str(model), text],
                        capture_output=True, text=True, timeout=60, preexec_fn=_set_mdwe)
    assert plain.returncode == wx.returncode == 0, wx.stderr
    assert wx.stdout == plain.stdout and wx.stdout.strip()

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(moed_bin), "serve", "-m", str(model), "--port", str(port), "--threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_set_mdwe)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http_get(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        import json
        import urllib.request
        body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4,
                           "ignore_eos": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=body), timeout=30) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        req = urllib.request.Request(url + "/tokenize", data=json.dumps({"content": text}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert " ".join(map(str, json.loads(r.read())["tokens"])) == plain.stdout.strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=45) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("k8s_version", ["1.28.0", "1.33.0"])
def test_k8s_manifests_validate_against_the_api_schemas(k8s_version):
    # Every field of every resource against Kubernetes' own OpenAPI schemas
    # (offline, strict: a misspelt field is an error, not silently dropped).
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for name, d in docs:
        try:
            kv.validate(d, k8s_version, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{name} {d['kind']}: {e}") from None
