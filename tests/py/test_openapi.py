"""docs/openapi.yaml against the live server: schemathesis generates
requests from the document (valid and deliberately invalid ones) for every
operation and checks that no response is a 5xx, that every status code and
content type is one the document lists, and that every JSON body matches
its documented schema. Bounded: a few dozen cases per operation on a tiny
model with a small context, well under two minutes."""
import pathlib
import re
import subprocess
import sys

import pytest
import schemathesis as st
import yaml

from moed_live import Server, make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "openapi.yaml"


def test_openapi_document_is_valid():
    schema = st.openapi.from_path(str(SPEC))
    ops = sorted(r.ok().label for r in schema.get_all_operations())
    doc = yaml.safe_load(SPEC.read_text())
    assert doc["openapi"].startswith("3.")
    # every path of the document is an operation schemathesis can test
    assert len(ops) == sum(len(v) for v in doc["paths"].values())
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/responses", "/v1/messages",
                 "/v1/messages/count_tokens"):
        assert path in doc["paths"]


# Hand-picked requests that reach the paths random data rarely does (a
# successful stream with logprobs and usage, n > 1, echo, several prompts,
# token prompts), each answered as the document says.
CASES = [
    ("/v1/chat/completions", "POST", {"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello!"}], "max_tokens": 8}, 200),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                      "max_tokens": 6, "stream": True, "n": 2, "logprobs": True, "top_logprobs": 2,
                                      "stream_options": {"include_usage": True}, "seed": 3, "temperature": 0.7}, 200),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                      "logprobs": True, "top_logprobs": 3, "stop": ["\n"], "n": 3}, 200),
    ("/v1/completions", "POST", {"prompt": "Once upon a time", "max_tokens": 8, "echo": True, "logprobs": 2}, 200),
    ("/v1/completions", "POST", {"prompt": ["a", "b c"], "max_tokens": 5, "stream": True, "logprobs": 1,
                                 "stream_options": {"include_usage": True}}, 200),
    ("/v1/completions", "POST", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "temperature": 0}, 200),
    ("/v1/completions", "POST", {"prompt": "x", "max_tokens": 100000}, 400),
    ("/v1/completions", "POST", {"prompt": "x", "model": "no-such-model"}, 404),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/responses", "POST", {"input": "Hello!", "instructions": "Be brief.", "max_output_tokens": 6}, 200),
    ("/v1/responses", "POST", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                               "max_output_tokens": 4, "stream": True}, 200),
    ("/v1/responses", "POST", {"input": "x", "store": True}, 400),
    ("/v1/messages", "POST", {"model": "tiny", "max_tokens": 6, "system": "Be brief.",
                              "messages": [{"role": "user", "content": "Hello!"}]}, 200),
    ("/v1/messages", "POST", {"model": "tiny", "max_tokens": 4, "stream": True, "stop_sequences": ["\n"],
                              "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 200),
    ("/v1/messages", "POST", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, 400),
    ("/v1/messages", "POST", {"model": "other", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/v1/messages/count_tokens", "POST", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, 200),
    ("/v1/models", "GET", None, 200),
    ("/v1/models/tiny", "GET", None, 200),
    ("/v1/models/other", "GET", None, 404),
    ("/health", "GET", None, 200),
    ("/metrics", "GET", None, 200),
    ("/tokenize", "POST", {"content": "Hello world", "add_special": True}, 200),
    ("/detokenize", "POST", {"tokens": [472, 401]}, 200),
    ("/detokenize", "POST", {"tokens": [-1]}, 400),
]


def template(path):
    return "/v1/models/{model}" if path.startswith("/v1/models/") else path


def test_live_server_conforms(tmp_path, moed_bin):
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    # A small context keeps every generated max_tokens cheap on the tiny model.
    srv = Server(moed_bin, model, tmp_path, args=["--ctx-size", "128"])
    try:
        srv.wait_healthy()
        schema = st.openapi.from_path(str(SPEC))
        schema.config.update(base_url=srv.url)
        for path, method, body, status in CASES:
            op = schema[template(path)][method]
            kwargs = {"body": body, "media_type": "application/json"} if body is not None else {}
            if path.startswith("/v1/models/"):
                kwargs["path_parameters"] = {"model": path.rsplit("/", 1)[1]}
            case = op.Case(**kwargs)
            r = case.call()
            assert r.status_code == status, (path, body, r.status_code, r.text[:500])
            case.validate_response(r)  # raises with the violation spelled out

        cmd = [sys.executable, "-m", "schemathesis.cli", "run", str(SPEC), "--url", srv.url,
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                           "response_schema_conformance",
               "--max-examples", "40", "--seed", "1", "--workers", "1", "--request-timeout", "30",
               "--generation-database", "none", "--no-color", "--suppress-health-check", "all"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        out = p.stdout + p.stderr
        assert srv.proc.poll() is None, f"moed serve died during the run:\n{srv.log()}\n{out[-4000:]}"
        assert p.returncode == 0, out[-8000:]
        # it really exercised the server
        m = re.search(r"(\d+) generated", out)
        assert m and int(m.group(1)) >= 200, out[-3000:]
    finally:
        assert srv.stop(timeout=45) == 0, srv.log()


def test_auth_answers_conform(tmp_path, moed_bin):
    # With api_key set: the document's security says /health and /metrics
    # are open and everything else needs the Bearer key (401 otherwise).
    model = make_tiny_model(moed_bin, tmp_path / "tiny.gguf")
    srv = Server(moed_bin, model, tmp_path, env={"MOED_API_KEY": "sk-a,sk-b"})
    try:
        srv.wait_healthy()
        schema = st.openapi.from_path(str(SPEC))
        schema.config.update(base_url=srv.url)
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        msg = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, method, body, headers, status in [
            ("/v1/models", "GET", None, {}, 401),
            ("/v1/models", "GET", None, {"Authorization": "Bearer sk-wrong"}, 401),
            ("/v1/models", "GET", None, {"Authorization": "Bearer sk-b"}, 200),
            ("/v1/chat/completions", "POST", chat, {}, 401),
            ("/v1/chat/completions", "POST", chat, {"Authorization": "Bearer sk-a"}, 200),
            ("/tokenize", "POST", {"content": "x"}, {}, 401),
            ("/v1/messages", "POST", msg, {}, 401),
            ("/v1/messages", "POST", msg, {"x-api-key": "sk-b"}, 200),
            ("/v1/responses", "POST", {"input": "x", "max_output_tokens": 2}, {"x-api-key": "sk-a"}, 200),
            ("/health", "GET", None, {}, 200),
            ("/metrics", "GET", None, {}, 200),
        ]:
            kwargs = {"body": body, "media_type": "application/json"} if body is not None else {}
            case = schema[path][method].Case(headers=headers, **kwargs)
            r = case.call()
            assert r.status_code == status, (path, headers, r.status_code, r.text[:300])
            case.validate_response(r)
            if status == 401 and path == "/v1/messages":
                assert r.json()["error"]["type"] == "authentication_error"
            elif status == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
    finally:
        assert srv.stop(timeout=45) == 0, srv.log()
