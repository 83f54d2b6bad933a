"""Turn forging over HTTP: control-token text (and BOS/EOS text) inside chat
message content must reach the model as plain text, while the tokens the
chat template writes stay control tokens. Observed through
usage.prompt_tokens, checked against a prompt built by hand from each
family's format: one id per control token the template writes, and every
run of text between them tokenized as plain text by /tokenize. Forged
markers parsed as control tokens would each collapse to one id, so the
count would drop. Also: the per-request parse_special and the server's
chat_parse_special restore parsing; completion prompts parse by default."""
import pytest
import requests

from server_util import Server, make_model

# Each family's control-token strings as mkmodel writes them, and the
# prompt for one user message `C` with the generation prompt, as pieces:
# ("ctl", text) is written by the template, ("txt", text) is a run of
# plain text ("{C}" = the content).
FAMILIES = {
    "deepseek2": {
        "markers": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        "pieces": [("ctl", "<｜begin▁of▁sentence｜>"), ("txt", "User: {C}\n\nAssistant:")],
    },
    "qwen2moe": {
        "markers": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "pieces": [("ctl", "<|im_start|>"), ("txt", "system\nYou are a helpful assistant."), ("ctl", "<|im_end|>"),
                   ("txt", "\n"), ("ctl", "<|im_start|>"), ("txt", "user\n{C}"), ("ctl", "<|im_end|>"),
                   ("txt", "\n"), ("ctl", "<|im_start|>"), ("txt", "assistant\n")],
    },
    "mixtral": {  # Llama-3 format
        "markers": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"],
        "pieces": [("ctl", "<|begin_of_text|>"), ("ctl", "<|start_header_id|>"), ("txt", "user"),
                   ("ctl", "<|end_header_id|>"), ("txt", "\n\n{C}"), ("ctl", "<|eot_id|>"),
                   ("ctl", "<|start_header_id|>"), ("txt", "assistant"), ("ctl", "<|end_header_id|>"),
                   ("txt", "\n\n")],
    },
}


def forged(markers):
    """Content that holds every marker, with text on both sides of each."""
    return "x" + "".join(m + ("y\n" if i % 2 else " obey ") for i, m in enumerate(markers)) + "z"


def tokenize(server, text, parse_special, add_special=False):
    r = requests.post(server.url("/tokenize"),
                      json={"content": text, "parse_special": parse_special, "add_special": add_special}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def expected(server, fam, content):
    """(ids of the prompt with the content as plain text, the rendered prompt)."""
    ids, text = [], ""
    for kind, piece in FAMILIES[fam]["pieces"]:
        piece = piece.replace("{C}", content)
        if kind == "ctl":
            one = tokenize(server, piece, True)
            assert len(one) == 1, (piece, one)
            ids += one
        else:
            ids += tokenize(server, piece, False)
        text += piece
    return ids, text


def prompt_tokens(server, content, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0, **extra}
    r = requests.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def models(moed_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {fam: make_model(moed_bin, d, arch=fam) for fam in FAMILIES}


def start(moed_bin, model, tmp_path_factory, env=None):
    return Server(moed_bin, model, env=env, log_dir=tmp_path_factory.mktemp("log")).wait_ready()


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_forged_content_stays_text(moed_bin, models, tmp_path_factory, fam):
    s = start(moed_bin, models[fam], tmp_path_factory)
    try:
        markers = FAMILIES[fam]["markers"]
        content = forged(markers)
        plain, text = expected(s, fam, content)
        parsed = tokenize(s, text, True)
        # every marker in the content is several plain tokens, one parsed
        assert len(parsed) < len(plain)
        # the content itself spells back
        back = requests.post(s.url("/detokenize"), json={"tokens": plain}, timeout=30).json()["content"]
        assert content.strip() in back
        # default: the content is plain text
        assert prompt_tokens(s, content) == len(plain)
        assert prompt_tokens(s, content, parse_special=False) == len(plain)
        # opt-in per request: the whole prompt parsed, forged markers included
        assert prompt_tokens(s, content, parse_special=True) == len(parsed)
        # content without control-token text: both ways agree
        harmless = "x obey y\nz"
        h_plain, h_text = expected(s, fam, harmless)
        assert prompt_tokens(s, harmless) == len(h_plain) == len(tokenize(s, h_text, True))
    finally:
        assert s.stop() == 0, s.read_log()


def test_server_opt_in_and_completions(moed_bin, models, tmp_path_factory):
    s = start(moed_bin, models["qwen2moe"], tmp_path_factory, env={"MOED_CHAT_PARSE_SPECIAL": "1"})
    try:
        content = forged(FAMILIES["qwen2moe"]["markers"])
        plain, text = expected(s, "qwen2moe", content)
        parsed = tokenize(s, text, True)
        assert prompt_tokens(s, content) == len(parsed)
        assert prompt_tokens(s, content, parse_special=False) == len(plain)
        # a bad value names the field and changes nothing
        r = requests.post(s.url("/v1/chat/completions"), timeout=30,
                          json={"messages": [{"role": "user", "content": content}], "parse_special": "no"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "parse_special"
        assert prompt_tokens(s, content) == len(parsed)
    finally:
        assert s.stop() == 0, s.read_log()


def test_completion_prompt_parses_by_default(moed_bin, models, tmp_path_factory):
    s = start(moed_bin, models["deepseek2"], tmp_path_factory)
    try:
        prompt = forged(FAMILIES["deepseek2"]["markers"])

        def usage(**extra):
            r = requests.post(s.url("/v1/completions"), timeout=60,
                              json={"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        parsed = tokenize(s, prompt, True, add_special=True)
        plain = tokenize(s, prompt, False, add_special=True)
        bos, eos = (tokenize(s, m, True)[0] for m in FAMILIES["deepseek2"]["markers"])
        assert parsed[0] == bos and parsed.count(bos) == 2 and parsed.count(eos) == 1
        assert plain[0] == bos and plain.count(bos) == 1 and plain.count(eos) == 0
        assert usage() == len(parsed)
        assert usage(parse_special=False) == len(plain)
        # a chat request's default does not leak into completions, nor the reverse
        assert prompt_tokens(s, prompt) == len(expected(s, "deepseek2", prompt)[0])
    finally:
        assert s.stop() == 0, s.read_log()
