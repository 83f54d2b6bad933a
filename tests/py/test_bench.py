"""`moed bench` end to end on the tiny fixture models: one run prints the
measured bandwidth, prefill and decode rates for every batch size with the
bytes per step and their ratios, all well-formed and positive (no timing
thresholds: the machine is shared). Usage errors and --device cuda fail
cleanly."""
import json
import pathlib
import re
import subprocess

import pytest

FIXDIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
SMALL = ["--prompt", "20", "--gen", "3", "--bw-mib", "32", "-t", "2"]


def bench(moed_bin, *args):
    return subprocess.run([str(moed_bin), "bench", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model", ["deepseek2.gguf", "qwen2moe.gguf", "llama.gguf"])
def test_json_report(moed_bin, model):
    p = bench(moed_bin, "-m", str(FIXDIR / model), *SMALL, "--batch", "4,1,2", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["device"] == "cpu" and r["threads"] == 2
    assert r["bandwidth"]["gbs"] > 0 and r["weight_bytes"] > 0
    # the best of all passes, the first measurement among them
    assert r["bandwidth"]["gbs"] >= r["bandwidth"]["first_gbs"] > 0 and r["bandwidth"]["passes"] > 5
    assert r["bandwidth"]["gbs"] >= r["bandwidth"]["between_steps_median_gbs"] > 0
    assert r["prefill"]["tokens"] == 20 and r["prefill"]["tok_s"] > 0 and r["prefill"]["seconds"] > 0
    # batch 1 first (the reference of every speed-up), then the others in the given order
    assert [d["batch"] for d in r["decode"]] == [1, 4, 2]
    moe = model != "llama.gguf"
    assert (r["moe_layers"] > 0) == moe
    for d in r["decode"]:
        assert d["steps"] == 3
        for k in ("seconds", "tok_s", "ms_per_step", "bytes_per_step", "dense_bytes_per_step", "kv_bytes_per_step",
                  "gbs", "bandwidth_ratio", "between_steps_median_ratio", "best_step_gbs", "best_step_bandwidth_ratio", "speedup"):
            assert d[k] > 0, (k, d)
        assert d["bytes_per_step"] == pytest.approx(
            d["dense_bytes_per_step"] + d["expert_bytes_per_step"] + d["kv_bytes_per_step"], rel=1e-6, abs=2)
        assert d["tok_s"] == pytest.approx(d["batch"] * d["steps"] / d["seconds"], rel=1e-2)
        assert d["bandwidth_ratio"] == pytest.approx(d["gbs"] / r["bandwidth"]["gbs"], rel=1e-2)
        # the fastest step is at least the mean rate
        assert d["best_step_gbs"] >= d["gbs"] * 0.999
        assert d["best_step_bandwidth_ratio"] == pytest.approx(d["best_step_gbs"] / r["bandwidth"]["gbs"], rel=1e-2)
        # dense weights are read once per step whatever the batch; more tokens never select fewer experts
        assert d["dense_bytes_per_step"] <= r["weight_bytes"] + 1e6
        if moe:
            assert d["expert_bytes_per_step"] > 0 and d["experts_per_moe_layer"] > 0
        else:
            assert d["expert_bytes_per_step"] == 0
    one = r["decode"][0]
    assert one["speedup"] == pytest.approx(1.0) and one["bytes_bound_speedup"] == pytest.approx(1.0)
    for d in r["decode"][1:]:
        assert d["speedup"] == pytest.approx(d["tok_s"] / one["tok_s"], rel=1e-2)
        assert d["bytes_bound_speedup"] == pytest.approx(
            d["batch"] * one["bytes_per_step"] / d["bytes_per_step"], rel=1e-3)
        assert d["dense_bytes_per_step"] == pytest.approx(one["dense_bytes_per_step"], rel=0.01)
        assert d["kv_bytes_per_step"] == pytest.approx(one["kv_bytes_per_step"] * d["batch"], rel=1e-6)
        if moe:
            assert d["experts_per_moe_layer"] >= one["experts_per_moe_layer"]


def test_text_report(moed_bin):
    p = bench(moed_bin, "-m", str(FIXDIR / "deepseek2lite.gguf"), *SMALL, "--batch", "1,3")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    bw = re.search(r"memory read bandwidth: ([0-9.]+) GB/s", out)
    pre = re.search(r"prefill: 20 tokens in ([0-9.]+) s = ([0-9.]+) tok/s", out)
    assert bw and float(bw.group(1)) > 0, out
    assert pre and float(pre.group(2)) > 0, out
    rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+) \(.*\)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)%"
                      r"\s+([0-9.]+)x  \(([0-9.]+)x\)$", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 3], out
    for r in rows:
        assert all(float(v) > 0 for v in r[1:]), r
    best = re.search(r"fastest step .*: batch 1 ([0-9.]+) GB/s = ([0-9.]+)%, batch 3 ([0-9.]+) GB/s = ([0-9.]+)%$", out, re.M)
    assert best and all(float(v) > 0 for v in best.groups()), out


def test_cuda_not_available(moed_bin):
    p = bench(moed_bin, "-m", str(FIXDIR / "llama.gguf"), "--device", "cuda")
    # CI and this machine have no GPU: a CUDA build finds no device (or, with
    # no driver, names CUDA's own error, e.g. 35), a CPU build says it has no
    # CUDA; either way a clear one-line refusal
    assert p.returncode == 1
    assert re.search(r"no CUDA device found|CUDA cannot use the GPU: .+ \(CUDA error \d+\)|built without CUDA",
                     p.stderr), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args", [
    [],
    ["-m", str(FIXDIR / "llama.gguf"), "--batch", "0"],
    ["-m", str(FIXDIR / "llama.gguf"), "--batch", "1,x"],
    ["-m", str(FIXDIR / "llama.gguf"), "--prompt", "0"],
    ["-m", str(FIXDIR / "llama.gguf"), "--gen", "-1"],
    ["-m", str(FIXDIR / "llama.gguf"), "--device", "tpu"],
    ["-m", str(FIXDIR / "llama.gguf"), "extra"],
])
def test_usage_errors(moed_bin, args):
    p = bench(moed_bin, *args)
    assert p.returncode == 2 and "usage: moed bench" in p.stderr


def test_help_lists_every_option(moed_bin):
    p = bench(moed_bin, "--help")
    assert p.returncode == 0
    for opt in ("--model", "--threads", "--prompt", "--gen", "--batch", "--device", "--bw-mib", "--json",
                "--energy-source", "--energy-busy-watts", "--energy-idle-watts", "--cost-per-hour", "--energy-price"):
        assert opt in p.stdout, opt
    assert "default 128" in p.stdout and "default 32" in p.stdout and "1,8,32" in p.stdout


def test_missing_model_fails(moed_bin, tmp_path):
    p = bench(moed_bin, "-m", str(tmp_path / "nope.gguf"), *SMALL)
    assert p.returncode == 1 and "nope.gguf" in p.stderr


def test_energy_per_token(moed_bin):
    # the estimate is busy watts x the timed passes, so J/token and $/1M
    # tokens follow from the report's own seconds (docs/cost.md)
    p = bench(moed_bin, "-m", str(FIXDIR / "llama.gguf"), *SMALL, "--batch", "1,3", "--json",
              "--energy-source", "estimate", "--energy-busy-watts", "100", "--cost-per-hour", "3.6",
              "--energy-price", "0.5")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    e = r["energy"]
    assert e["source"] == "estimate" and e["cost_per_hour"] == 3.6 and e["energy_price"] == 0.5
    assert e["prefill"]["joules"] == pytest.approx(100 * r["prefill"]["seconds"], rel=0.25)
    assert e["prefill"]["joules_per_token"] == pytest.approx(e["prefill"]["joules"] / 20, rel=1e-6)
    for d, en in zip(r["decode"], e["decode"]):
        toks = d["batch"] * d["steps"]
        assert en["batch"] == d["batch"]
        assert en["joules"] == pytest.approx(100 * d["seconds"], rel=0.05)
        assert en["joules_per_token"] == pytest.approx(en["joules"] / toks, rel=1e-6)
        want = (d["seconds"] * 3.6 / 3600 + en["joules"] / 3.6e6 * 0.5) / toks * 1e6
        assert en["usd_per_1m_tokens"] == pytest.approx(want, rel=1e-6)
    # text: one line with every figure; off: none
    p = bench(moed_bin, "-m", str(FIXDIR / "llama.gguf"), *SMALL, "--batch", "1,3", "--cost-per-hour", "2")
    line = re.search(r"^energy \((\w+)[^)]*\$2/h[^)]*\): prefill ([0-9.e+-]+) J/token, \$([0-9.e+-]+)/1M tokens; "
                     r"decode batch 1 ([0-9.e+-]+) J/token, \$([0-9.e+-]+)/1M tokens, "
                     r"decode batch 3 ([0-9.e+-]+) J/token, \$([0-9.e+-]+)/1M tokens$", p.stdout, re.M)
    assert line and line.group(1) in ("rapl", "estimate", "nvml"), p.stdout
    assert all(float(v) > 0 for v in line.groups()[1:]), line.groups()
    p = bench(moed_bin, "-m", str(FIXDIR / "llama.gguf"), *SMALL, "--json", "--energy-source", "off")
    assert json.loads(p.stdout)["energy"] is None
    p = bench(moed_bin, "-m", str(FIXDIR / "llama.gguf"), "--cost-per-hour", "-1")
    assert p.returncode == 2 and "cost_per_hour" in p.stderr
