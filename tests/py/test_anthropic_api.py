"""POST /v1/messages and /v1/messages/count_tokens through the official
`anthropic` SDK against a live server with a tiny random-weight model.
The reference for every generated text and token count is the server's
own /v1/chat/completions answer to the same conversation (greedy, so the
two must agree token for token)."""
import json

import anthropic
import openai
import pytest
import requests

from server_util import Server, make_model

MODEL = "tiny"
SYSTEM = "You are terse."
USER = "Say something."
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    s = Server(moed_bin, model, "--served-model-name", MODEL, log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def chat_reference(oai, max_tokens, system=SYSTEM, user=USER, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True, **extra})


def create(client, max_tokens=8, system=SYSTEM, **kw):
    if system is not None:
        kw["system"] = system
    # temperature is no argument of this SDK's create() (newer Claude models fix it); the API still has it
    return client.messages.create(model=MODEL, max_tokens=max_tokens,
                                  messages=kw.pop("messages", [{"role": "user", "content": USER}]),
                                  extra_body=GREEDY, **kw)


def test_message_matches_chat(client, oai):
    ref = chat_reference(oai, 8)
    m = create(client, 8)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == ref.choices[0].message.content
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 8
    assert m.usage.input_tokens == ref.usage.prompt_tokens


def test_system_prompt_forms(client, oai):
    no_sys = create(client, 4, system=None)
    assert no_sys.content[0].text == chat_reference(oai, 4, system=None).choices[0].message.content
    as_blocks = create(client, 4, system=[{"type": "text", "text": SYSTEM}])
    as_string = create(client, 4)
    assert as_blocks.content[0].text == as_string.content[0].text
    assert as_blocks.usage.input_tokens == as_string.usage.input_tokens > no_sys.usage.input_tokens
    # user content as text blocks is the same prompt as the string
    blocks = create(client, 4, messages=[{"role": "user", "content": [{"type": "text", "text": USER}]}])
    assert blocks.content[0].text == as_string.content[0].text


def test_count_tokens(client, oai):
    n = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=[{"role": "user", "content": USER}])
    assert n.input_tokens == chat_reference(oai, 1).usage.prompt_tokens


def test_thinking_blocks_in_history_are_dropped(client):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    plain = client.messages.count_tokens(model=MODEL, messages=turns)
    turns[1] = {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm " * 50, "signature": "x"},
                                                 {"type": "text", "text": "b"}]}
    assert client.messages.count_tokens(model=MODEL, messages=turns).input_tokens == plain.input_tokens


def test_stream_helper_and_raw_events(client):
    full = create(client, 10)
    with client.messages.stream(model=MODEL, max_tokens=10, system=SYSTEM,
                                messages=[{"role": "user", "content": USER}], extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == full.content[0].text
    assert final.content[0].text == text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 10 and final.usage.input_tokens == full.usage.input_tokens

    events = list(create(client, 10, stream=True))
    types = [e.type for e in events]
    # (the SDK drops the ping event; test_raw_http_shapes sees it)
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    start = events[0].message
    assert start.id.startswith("msg_") and start.role == "assistant" and start.content == []
    assert start.usage.input_tokens == full.usage.input_tokens and start.stop_reason is None
    assert "".join(e.delta.text for e in events[2:-3]) == full.content[0].text
    assert all(e.index == 0 and e.delta.type == "text_delta" for e in events[2:-3])
    delta = events[-2]
    assert delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 10


def plain_window(text, start, width):
    """A substring of printable ASCII (no U+FFFD stand-ins for split bytes)."""
    for i in range(start, len(text) - width):
        w = text[i:i + width]
        if all(32 < ord(ch) < 127 for ch in w):
            return w
    pytest.skip(f"no plain {width}-character window in the sampled text {text!r}")


def test_stop_sequences(client):
    base = create(client, 40).content[0].text
    s1 = plain_window(base, 4, 3)
    s2 = plain_window(base, len(base) // 2, 2)
    for stops, hit in (([s1], s1), ([s2, "\u00a7never"], s2), (["\u00a7never", s1], s1)):
        m = create(client, 40, stop_sequences=stops)
        cut = base.index(hit)
        assert m.content[0].text == base[:cut], (stops, base)
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == hit
        assert m.usage.output_tokens < 40
        with client.messages.stream(model=MODEL, max_tokens=40, system=SYSTEM, stop_sequences=stops,
                                    messages=[{"role": "user", "content": USER}], extra_body=GREEDY) as s:
            assert "".join(s.text_stream) == base[:cut]
            final = s.get_final_message()
        assert final.stop_reason == "stop_sequence" and final.stop_sequence == hit


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 4}, "messages"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages.1.role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                                   "content": "r"}]}]}, "messages.0.content.0.type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0.type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled",
                                                                                     "budget_tokens": 1024}},
     "thinking"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"}, "stop_sequences"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "stop_sequences": [""]}, "stop_sequences.0"),
    ({"max_tokens": 100000, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 4, "system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]},
     "system.0.type"),
])
def test_bad_requests_name_the_field(client, server, body, field):
    # the SDK's low-level post: messages.create would refuse the bodies that lack a required field itself
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.post("/v1/messages", body={"model": MODEL, **body}, cast_to=object)
    err = ei.value.body["error"]
    assert ei.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith(field + ":"), err
    assert ei.value.body["type"] == "error"
    # the server keeps serving
    assert requests.get(server.url("/health")).status_code == 200


def test_unknown_model_and_bad_json(client, server):
    with pytest.raises(anthropic.NotFoundError) as ei:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "not_found_error" and "model" in ei.value.body["error"]["message"]
    r = requests.post(server.url("/v1/messages"), data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(server.url("/v1/messages"))
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_x_api_key(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--served-model-name", MODEL, env={"MOED_API_KEY": "k1"}, log_dir=tmp_path).wait_ready()
    try:
        kw = dict(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}],
                  extra_body={"ignore_eos": True})
        good = anthropic.Anthropic(base_url=s.base, api_key="k1", max_retries=0)
        assert good.messages.create(**kw).usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as ei:
            anthropic.Anthropic(base_url=s.base, api_key="wrong", max_retries=0).messages.create(**kw)
        assert ei.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                           "message": ei.value.body["error"]["message"]}}
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        # Bearer works here too, and x-api-key on the OpenAI endpoints
        assert requests.post(s.url("/v1/messages"), json=body,
                             headers={"Authorization": "Bearer k1"}).status_code == 200
        assert requests.get(s.url("/v1/models"), headers={"x-api-key": "k1"}).status_code == 200
        assert requests.get(s.url("/v1/models"), headers={"x-api-key": "k2"}).status_code == 401
        # the OpenAI endpoints keep OpenAI's error shape
        r = requests.get(s.url("/v1/models"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    finally:
        assert s.stop() == 0


def test_raw_http_shapes(server):
    """What the SDK hides: headers and the exact SSE framing."""
    body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "ignore_eos": True}
    r = requests.post(server.url("/v1/messages"), json=body, headers={"anthropic-version": "2023-06-01"}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-request-id"].startswith("msg_")
    frames = [f for f in r.text.split("\n\n") if f and not f.startswith(":")]
    names = []
    for f in frames:
        ev, data = f.split("\n")
        assert ev.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == ev[7:]
        names.append(ev[7:])
    assert names[:3] == ["message_start", "content_block_start", "ping"] and names[-1] == "message_stop"
    assert r.text.endswith("\n\n") and "[DONE]" not in r.text
