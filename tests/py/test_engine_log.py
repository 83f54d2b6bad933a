"""Engine lines (moe_log) go through the server's logger: with --log-format json
every line the daemon writes is one JSON object, the forward-pass profile included."""
import json

import requests

from server_util import Server, make_model


def test_engine_lines_are_json(moed_bin, tmp_path):
    model = make_model(moed_bin, tmp_path)
    # MOE_FWD_PROFILE makes the engine log its op table when the pass is freed (at shutdown)
    s = Server(moed_bin, model, "--log-format", "json", env={"MOE_FWD_PROFILE": "1"}, log_dir=tmp_path).wait_ready()
    try:
        body = {"model": model.stem, "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        assert requests.post(s.url("/v1/completions"), json=body).status_code == 200
    finally:
        assert s.stop() == 0
    lines = [ln for ln in s.read_log().splitlines() if ln.strip()]
    objs = []
    for ln in lines:
        try:
            objs.append(json.loads(ln))
        except ValueError:
            raise AssertionError(f"not a JSON line: {ln!r}")
    msgs = [o.get("msg", "") for o in objs]
    prof = [m for m in msgs if m.startswith("moe_fwd profile, steps of")]
    assert prof, msgs
    # the table's rows: each op once per bucket, with its share of the time
    ops = [m.split()[0] for m in msgs if m.startswith("  ") and " calls " in m]
    assert "matmul" in ops and ("attention" in ops or "mla_attention" in ops), msgs
    assert all(o["level"] == "info" for o in objs if o.get("msg", "").startswith("moe_fwd profile"))
