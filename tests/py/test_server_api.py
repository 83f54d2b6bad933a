"""`moed serve` through the official openai SDK against a live server with a
tiny random-weight DeepSeek-V2 model: chat and completions, streamed and
not, usage, stop strings, n, logprobs, seeds, /v1/models, /metrics,
/tokenize, /detokenize, /health, CORS, API keys."""
import json
import threading
import time

import openai
import pytest
import requests

from server_util import Server, make_model, metric, sse_events

MODEL = "tiny"


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    s = Server(moed_bin, model, "--served-model-name", MODEL, "--cors-origins", "https://app.example",
               log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


def test_health_and_models(server, client, model):
    r = requests.get(server.url("/health"))
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    # the file's own id is accepted as an alias
    assert requests.get(server.url(f"/v1/models/{model.stem}")).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert len(r.choices) == 1
    ch = r.choices[0]
    assert ch.index == 0 and ch.message.role == "assistant" and isinstance(ch.message.content, str)
    assert ch.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_stream_matches_non_stream(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    # echo puts the prompt first
    e = client.completions.create(echo=True, **kw)
    assert e.choices[0].text == "Once upon a time" + r.choices[0].text
    # default max_tokens for completions is 16
    d = client.completions.create(model=MODEL, prompt="x", temperature=0, extra_body={"ignore_eos": True})
    assert d.usage.completion_tokens == 16


def test_completion_prompt_forms(client, server):
    toks = requests.post(server.url("/tokenize"), json={"content": "hello world"}).json()["tokens"]
    with_bos = requests.post(server.url("/tokenize"), json={"content": "hello world", "add_special": True}).json()
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt="hello world", **kw)
    # a text prompt is tokenized as /tokenize with add_special (BOS when the model asks for it)
    assert a.usage.prompt_tokens == len(with_bos["tokens"])
    b = client.completions.create(prompt=with_bos["tokens"], **kw)
    assert b.choices[0].text == a.choices[0].text
    # several prompts -> one choice group per prompt, in order
    many = client.completions.create(prompt=["hello world", "Once upon a time"], n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == a.choices[0].text
    assert many.choices[2].text == many.choices[3].text
    assert many.usage.completion_tokens == 4 * 6
    tt = client.completions.create(prompt=[with_bos["tokens"], toks[:1]], **kw)
    assert len(tt.choices) == 2 and tt.choices[0].text == a.choices[0].text


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", temperature=0, extra_body={"ignore_eos": True})
    base = client.completions.create(max_tokens=40, **kw).choices[0].text
    assert len(base) > 12
    for stop in (base[6:9], base[len(base) // 2:len(base) // 2 + 2], [base[10:14], "\u00a7never"]):
        r = client.completions.create(max_tokens=40, stop=stop, **kw)
        s = stop if isinstance(stop, str) else stop[0]
        cut = base.index(s)
        assert r.choices[0].text == base[:cut], (stop, base)
        assert s not in r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
        # streamed: the same text, never the stop string, even split across chunks
        chunks = list(client.completions.create(max_tokens=40, stop=stop, stream=True, **kw))
        st = "".join(c.choices[0].text for c in chunks if c.choices)
        assert st == base[:cut]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: identical
    assert r.usage.completion_tokens == 12
    s = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=5,
                                       stream=True, extra_body={"ignore_eos": True})
    seen = {}
    for c in s:
        for ch in c.choices:
            seen.setdefault(ch.index, []).append(ch)
    assert sorted(seen) == [0, 1]
    assert all(chs[0].delta.role == "assistant" for chs in seen.values())


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        # greedy: the sampled token is the most likely one
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or "\ufffd" in e.token
    c = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # streamed chat logprobs ride on each chunk
    s = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       stream=True, extra_body={"ignore_eos": True})
    n = sum(len(c.choices[0].logprobs.content) for c in s if c.choices and c.choices[0].logprobs)
    assert n == 3
    # no logprobs unless asked
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices[0].logprobs is None


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=4321, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}],
        max_completion_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
        logit_bias={"5": 2}, stop=["zzz"], user="u",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_logit_bias_forces_token(client, server):
    # +100 on one id makes it the greedy choice every step
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0, logit_bias={"300": 100},
                                  logprobs=0, extra_body={"ignore_eos": True})
    piece = requests.post(server.url("/detokenize"), json={"tokens": [300]}).json()["content"]
    assert r.choices[0].text == piece * 4


def test_tokenize_roundtrip(server):
    t = requests.post(server.url("/tokenize"), json={"content": "Hello, world! héllo"})
    assert t.status_code == 200
    ids = t.json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    d = requests.post(server.url("/detokenize"), json={"tokens": ids})
    assert d.json()["content"] == "Hello, world! héllo"
    bad = requests.post(server.url("/detokenize"), json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=5, extra_body={"ignore_eos": True})
    m = server.metrics()
    assert metric(m, "moed_generation_tokens_total") >= 5
    assert metric(m, "moed_prompt_tokens_total") >= 1
    assert metric(m, "moed_kv_blocks_total") > 0
    assert metric(m, "moed_time_to_first_token_seconds_count") >= 1
    assert metric(m, "moed_inter_token_latency_seconds_count") >= 4
    assert metric(m, "moed_batch_size_count") >= 1
    # histogram buckets are cumulative and end at the count
    b = sorted((float(dict(ls)["le"]), v) for (n, ls), v in m.items() if n == "moed_batch_size_bucket")
    assert [v for _, v in b] == sorted(v for _, v in b)
    assert b[-1][1] == metric(m, "moed_batch_size_count")
    assert metric(m, "moed_http_requests_total", code=200) >= 1
    # _sum is the exact number of sequences stepped: alone, an n=3 request steps
    # 1, 2 or 3 sequences at a time, so each bucket's steps have a known size
    before = server.metrics()
    client.completions.create(model=MODEL, prompt="count", max_tokens=4, n=3, extra_body={"ignore_eos": True})
    after = server.metrics()

    def d(name, **lb):
        return metric(after, name, **lb) - metric(before, name, **lb)
    c1, c2, c4 = (d("moed_batch_size_bucket", le=x) for x in ("1", "2", "4"))
    assert c4 == d("moed_batch_size_count") and c4 > c2  # some steps had all three
    assert d("moed_batch_size_sum") == 1 * c1 + 2 * (c2 - c1) + 3 * (c4 - c2)


def test_cors(server):
    r = requests.options(server.url("/v1/chat/completions"),
                         headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    g = requests.get(server.url("/v1/models"), headers={"Origin": "https://app.example"})
    assert g.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = requests.get(server.url("/v1/models"), headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_request_log_lines(server, client):
    client.completions.create(model=MODEL, prompt="SECRET PROMPT TEXT", max_tokens=3, extra_body={"ignore_eos": True})
    time.sleep(0.2)
    log = server.read_log()
    line = [ln for ln in log.splitlines() if "POST /v1/completions" in ln][-1]
    for field in ("id=cmpl-", "status=200", "model=tiny", "prompt_tokens=", "completion_tokens=3", "ttft_ms=",
                  "total_ms="):
        assert field in line, line
    assert "SECRET PROMPT TEXT" not in log


def test_api_key_and_json_logs(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--log-format", "json", "--log-prompts",
               env={"MOED_API_KEY": "k1,k2"}, log_dir=tmp_path).wait_ready()
    try:
        # ignore_eos: the sampled (unseeded) output must not end early
        body = {"model": model.stem, "prompt": "SECRET", "max_tokens": 2, "ignore_eos": True}
        r = requests.post(s.url("/v1/completions"), json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = requests.post(s.url("/v1/completions"), json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        for k in ("k1", "k2"):
            r = requests.post(s.url("/v1/completions"), json=body, headers={"Authorization": f"Bearer {k}"})
            assert r.status_code == 200, r.text
        c = openai.OpenAI(base_url=s.url("/v1"), api_key="k2", max_retries=0)
        assert c.completions.create(model=model.stem, prompt="x", max_tokens=1,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url("/v1"), api_key="nope", max_retries=0).models.list()
        # /health and /metrics stay open
        assert requests.get(s.url("/health")).status_code == 200
        assert requests.get(s.url("/metrics")).status_code == 200
    finally:
        assert s.stop() == 0
    lines = [json.loads(ln) for ln in s.read_log().splitlines() if ln.startswith("{")]
    reqs = [ln for ln in lines if ln.get("msg") == "request" and ln["path"] == "/v1/completions"]
    assert [ln["status"] for ln in reqs][:2] == [401, 401]
    ok = [ln for ln in reqs if ln["status"] == 200][0]
    assert ok["completion_tokens"] == 2 and "ttft_ms" in ok and "total_ms" in ok and ok["id"].startswith("cmpl-")
    # --log-prompts logs the prompt (once)
    assert sum(1 for ln in lines if ln.get("msg") == "prompt" and ln["prompt"] == "SECRET") == 2  # the 401s never got parsed


def test_concurrent_mixed(client):
    """Streams and non-streamed requests at once all complete with their own text."""
    out, errs = {}, []

    def run(i):
        try:
            kw = dict(model=MODEL, prompt=f"prompt {i}", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            if i % 2:
                out[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
            else:
                out[i] = client.completions.create(**kw).choices[0].text
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    th = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    [t.start() for t in th]
    [t.join() for t in th]
    assert not errs
    ref = {i: client.completions.create(model=MODEL, prompt=f"prompt {i}", max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for i in (0, 1)}
    assert out[0] == ref[0] and out[1] == ref[1]
