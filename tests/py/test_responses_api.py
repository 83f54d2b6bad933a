"""POST /v1/responses (stateless) through the official openai SDK against a
live server with a tiny random-weight model. The reference for every
generated text and token count is the server's /v1/chat/completions answer
to the same conversation (greedy, so the two must agree)."""
import json

import openai
import pytest
import requests

from server_util import Server, make_model

MODEL = "tiny"
INSTR = "You are terse."
USER = "Say something."
GREEDY = {"ignore_eos": True}


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
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def reference(client, n):
    return client.chat.completions.create(model=MODEL, max_tokens=n, temperature=0, extra_body=GREEDY,
                                          messages=[{"role": "system", "content": INSTR},
                                                    {"role": "user", "content": USER}])


def test_response_matches_chat(client):
    ref = reference(client, 8)
    r = client.responses.create(model=MODEL, instructions=INSTR, input=USER, max_output_tokens=8, temperature=0,
                                extra_body=GREEDY)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == ref.choices[0].message.content
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].id.startswith("msg_") and r.output[0].content[0].type == "output_text"
    # cut by max_output_tokens: incomplete, as OpenAI reports it
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == ref.usage.prompt_tokens and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.instructions == INSTR and r.max_output_tokens == 8 and r.temperature == 0 and r.store is False


def test_input_items_are_the_same_prompt(client):
    kw = dict(model=MODEL, max_output_tokens=6, temperature=0, extra_body=GREEDY)
    as_string = client.responses.create(instructions=INSTR, input=USER, **kw)
    items = client.responses.create(input=[
        {"role": "developer", "content": INSTR},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER}]}], **kw)
    assert items.output_text == as_string.output_text
    assert items.usage.input_tokens == as_string.usage.input_tokens
    # an earlier answer passed back as output_text makes a longer prompt
    turn2 = client.responses.create(input=[
        {"role": "user", "content": USER},
        {"role": "assistant", "content": [{"type": "output_text", "text": as_string.output_text}]},
        {"role": "user", "content": "More."}], **kw)
    assert turn2.usage.input_tokens > as_string.usage.input_tokens


def test_stream_events(client):
    full = client.responses.create(model=MODEL, instructions=INSTR, input=USER, max_output_tokens=10, temperature=0,
                                   extra_body=GREEDY)
    events = list(client.responses.create(model=MODEL, instructions=INSTR, input=USER, max_output_tokens=10,
                                          temperature=0, stream=True, extra_body=GREEDY))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events[4:-4])
    assert deltas == full.output_text == events[-4].text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2])
    last = events[-1].response
    assert last.id == events[0].response.id and last.output_text == full.output_text
    assert last.usage.output_tokens == 10 and last.usage.input_tokens == full.usage.input_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_stream_helper(client):
    full = client.responses.create(model=MODEL, input=USER, max_output_tokens=7, temperature=0, extra_body=GREEDY)
    with client.responses.stream(model=MODEL, input=USER, max_output_tokens=7, temperature=0,
                                 extra_body=GREEDY) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert text == full.output_text


@pytest.mark.parametrize("extra, field", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}, "text.format"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
])
def test_refused_fields(client, server, extra, field):
    body = {"model": MODEL, "input": "x", **extra}
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/responses", body=body, cast_to=object)
    err = ei.value.body
    assert ei.value.status_code == 400 and err["param"] == field and err["type"] == "invalid_request_error", err
    assert requests.get(server.url("/health")).status_code == 200


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="x", max_output_tokens=2)


def test_raw_sse_framing(server):
    r = requests.post(server.url("/v1/responses"), stream=True,
                      json={"model": MODEL, "input": "x", "max_output_tokens": 3, "stream": True, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-request-id"].startswith("resp_")
    frames = [f for f in r.text.split("\n\n") if f and not f.startswith(":")]
    for f in frames:
        ev, data = f.split("\n")
        assert json.loads(data[len("data: "):])["type"] == ev[len("event: "):]
    assert "[DONE]" not in r.text
