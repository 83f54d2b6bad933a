"""Energy and cost per request over HTTP (docs/cost.md): usage.energy_joules
and usage.cost_usd in responses, final stream chunks and the request log;
their sum against the /metrics totals; the estimate's watts and the prices
against a hand-computed cost; energy_source off; bad settings."""
import concurrent.futures
import os
import re
import subprocess
import time

import pytest
import requests

from server_util import Server, make_model, metric, sse_events

BUSY_W, IDLE_W, PER_HOUR, PER_KWH = 200.0, 20.0, 3.6, 0.5


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    # the estimate: the same on every host (RAPL/NVML readings are not
    # predictable), and exactly busy watts x attributed seconds
    s = Server(moed_bin, model, "--energy-source", "estimate", "--energy-busy-watts", str(BUSY_W),
               "--energy-idle-watts", str(IDLE_W), "--cost-per-hour", str(PER_HOUR), "--energy-price", str(PER_KWH),
               log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


def energy_metrics(server):
    m = server.metrics()
    return {"attr": metric(m, "moed_energy_attributed_joules_total"), "idle": metric(m, "moed_energy_idle_joules_total"),
            "total": metric(m, "moed_energy_joules_total", source="estimate"),
            "secs": metric(m, "moed_energy_attributed_seconds_total"), "cost": metric(m, "moed_cost_usd_total"),
            "jpt": metric(m, "moed_energy_joules_per_token"), "dpm": metric(m, "moed_cost_usd_per_1m_tokens")}


def one(server, i):
    """Request i of a mix: chat and completions, streamed (usage in the last
    chunk) and not, n=2, two prompts; returns its usage."""
    kind = i % 4
    body = {"model": "x", "max_tokens": 3 + i % 5, "temperature": 0, "ignore_eos": True}
    if kind in (0, 1):
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "count " * (1 + i % 7)}]
        if kind == 1:
            body["n"] = 2
    else:
        path = "/v1/completions"
        body["prompt"] = ["a b c", "d e f g h"] if kind == 3 else "once upon " * (1 + i % 5)
    body.pop("model")
    if i % 2:
        body.update(stream=True, stream_options={"include_usage": True})
        with requests.post(server.url(path), json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200, r.text
            events = [e for e in sse_events(r) if e != "[DONE]"]
        for e in events[:-1]:
            assert e.get("usage") is None
        return events[-1]["usage"]
    r = requests.post(server.url(path), json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_sum_of_requests_equals_metrics_total(server):
    before = energy_metrics(server)
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        usages = list(ex.map(lambda i: one(server, i), range(24)))
    after = energy_metrics(server)
    joules = sum(u["energy_joules"] for u in usages)
    cost = sum(u["cost_usd"] for u in usages)
    for u in usages:
        assert u["energy_joules"] > 0 and u["cost_usd"] > 0, u
        # the estimate charges busy watts over the request's share of step
        # time, so cost = J / BUSY_W s x $/h / 3600 + J / 3.6e6 x $/kWh
        want = u["energy_joules"] / BUSY_W * PER_HOUR / 3600 + u["energy_joules"] / 3.6e6 * PER_KWH
        assert u["cost_usd"] == pytest.approx(want, rel=1e-9), u
    d_attr = after["attr"] - before["attr"]
    assert joules == pytest.approx(d_attr, rel=0.01), (joules, d_attr)
    assert cost == pytest.approx(after["cost"] - before["cost"], rel=0.01)
    # the books balance: measured = attributed + idle, and the estimate is
    # exactly busy watts x attributed seconds
    assert after["total"] == pytest.approx(after["attr"] + after["idle"], rel=1e-9)
    assert after["attr"] == pytest.approx(BUSY_W * after["secs"], rel=1e-9)
    # the 60 s window holds these requests: J per computed token is between
    # the whole-run figure's bounds, and $ per 1M tokens follows from it
    assert after["jpt"] > 0
    assert after["dpm"] == pytest.approx(after["jpt"] * 1e6 * (PER_HOUR / 3600 / BUSY_W + PER_KWH / 3.6e6), rel=1e-6)


def test_request_log_line_carries_energy_and_cost(server):
    r = requests.post(server.url("/v1/completions"), json={"prompt": "log me", "max_tokens": 2}, timeout=60)
    u = r.json()["usage"]
    rid = r.json()["id"]
    # the line is written once the response is sent: it may trail the answer
    deadline = time.time() + 10
    while True:
        log = server.read_log()
        line = [ln for ln in log.splitlines() if rid in ln and "status=200" in ln]
        if line or time.time() > deadline:
            break
        time.sleep(0.05)
    assert line, log[-2000:]
    j = float(re.search(r"energy_j=([0-9.e+-]+)", line[0]).group(1))
    c = float(re.search(r"cost_usd=([0-9.e+-]+)", line[0]).group(1))
    assert j == pytest.approx(u["energy_joules"], rel=1e-5) and c == pytest.approx(u["cost_usd"], rel=1e-5)
    assert "energy: estimate, not measured" in log


def test_off_means_no_fields(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--energy-source", "off", "--cost-per-hour", "2", log_dir=tmp_path).wait_ready()
    try:
        u = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2}, timeout=60).json()["usage"]
        assert "energy_joules" not in u and "cost_usd" not in u and u["completion_tokens"] == 2
        text = requests.get(s.url("/metrics"), timeout=10).text
        assert "moed_energy_joules_total" not in text and "moed_cost_usd_total" not in text
    finally:
        assert s.stop() == 0


def test_no_price_means_energy_without_cost(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, log_dir=tmp_path).wait_ready()  # defaults: auto, no prices
    try:
        u = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2}, timeout=60).json()["usage"]
        assert u["energy_joules"] > 0 and "cost_usd" not in u
        m = s.metrics()
        sources = {dict(ls)["source"] for (n, ls) in m if n == "moed_energy_joules_total"}
        assert sources <= {"rapl", "nvml", "estimate"} and len(sources) == 1
        if not os.access("/sys/class/powercap/intel-rapl:0/energy_uj", os.R_OK) and not os.path.exists("/dev/nvidia0"):
            assert sources == {"estimate"}
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("args,needle", [
    (["--energy-source", "wind"], "energy_source: 'wind' is not auto, nvml, rapl, estimate or off"),
    (["--energy-busy-watts", "-3"], "energy_busy_watts"),
    (["--cost-per-hour", "abc"], "cost_per_hour"),
])
def test_bad_settings_are_refused(moed_bin, model, args, needle):
    p = subprocess.run([str(moed_bin), "serve", "-m", str(model), "--port", "0", *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and needle in p.stderr, p.stderr


def test_unreadable_named_source_names_the_cause(moed_bin, model, tmp_path):
    """rapl where the counters cannot be read fails the load, naming why;
    where they can, the figures are labelled rapl."""
    readable = os.access("/sys/class/powercap/intel-rapl:0/energy_uj", os.R_OK)
    s = Server(moed_bin, model, "--energy-source", "rapl", log_dir=tmp_path)
    if readable:
        s.wait_ready()
        try:
            assert metric(s.metrics(), "moed_energy_joules_total", source="rapl") >= 0
        finally:
            assert s.stop() == 0
        return
    assert s.proc.wait(timeout=60) != 0
    s.log.close()
    assert "energy_source: rapl: " in s.read_log()
