#!/usr/bin/env python3
"""Differential fuzz of moed's tokenizer against the real ones (not run in CI).

Random mixed-script strings are encoded by Hugging Face `tokenizers` (BPE
families) or the `sentencepiece` library (Mistral models), and by
build/tests/tool_tokcmp on the committed fixture GGUFs; ids must be
identical with and without special-token parsing, and the special decode
must give the input back. Random id sequences (mostly single-byte tokens,
so UTF-8 breaks often) must decode as HF / sentencepiece decode them, and
streaming must equal the one-shot decode.

Same venv as tests/gen_tokenizer_fixtures.py:
    make CUDA=0 build/tests/tool_tokcmp
    /tmp/tokvenv/bin/python tests/fuzz_tokenizers.py [N [SEED]]
(3000 cases per family: 0 mismatches on all six families at the time of writing.)
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import unicodedata

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_tokenizer_fixtures as gen  # noqa: E402

import sentencepiece as spm  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

ROOT = gen.ROOT
# TOKCMP=build-asan/tests/tool_tokcmp runs it under the sanitizers
TOOL = pathlib.Path(os.environ.get("TOKCMP", ROOT / "build" / "tests" / "tool_tokcmp"))

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " ", "  ", "\n", "\r\n", "\t", "\x0b\x0c\x85\u00a0\u1680\u2000\u2009\u200a\u2028\u2029\u202f\u205f\u3000",
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出要就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多",
    "ぁあいうえおかがきぎくぐけげこごさざしじすずせぜそぞアイウエオカガキギクグケゲコゴ゠ーヽヾ", "가각간갇갈갉갊감갑값갓강개객거건걸검겁것겉게ㄱㄴㄷ",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГД", "αβγδεζηθικλμνξοπρστυφχψωΆΈΉΊΌΎΏ",
    "\u0300\u0301\u0302\u0308\u0327\u0345\u20dd\u0489", "😀😃😄😁🙂🎉🚀👍🏽\u200d❤️🇺🇸", "ＡＢＣａｂｃ０１２！＂＃（）：；",
    "µÀÖØöøƺƼƿǄʓʕʯͰͳͶͷͻͽͿΆΈΊΌΎΡΣϵϷҁҊԯԱՖႠჅᎠᏵᏸᏽᲐᲺᲽᲿᴀᴫᵫᵷᵹᶚḀἕἘ", "‘’‚‛“”„‟　、。〃〄々〆〇〈〉《》",
    "١٢٣٤٥ⅠⅡⅫ½¼²³₁₂", "àáâãäåæçèéêëìíîïñòóôõöùúûüý", "ﬁﬂ№™℃ℂℇℊℕℙΩKÅ", "'s'S't're've'm'll'd'D",
    "ࠀࠁࠂ一龥龦", "ئابتثجحخدذرزسشصضطظعغ", "אבגדהוזחטיכלמנסעפצקרשת", "कखगघङचछजझञ\u093f\u0940",
    "\U0001D518\U0001D52B\U00010400\U0010FFFD\ue000",
    "<|im_start|><|im_end|><|endoftext|><｜begin▁of▁sentence｜><｜User｜><｜Assistant｜><think></think>"
    "<|eot_id|><|begin_of_text|>▁Ġ", "[INST][/INST][TOOL_CALLS]<s></s>▁ ",
]


def rand_str(r: random.Random) -> str:
    out = []
    for _ in range(r.choice([1, 2, 3, 5, 8, 13, 30, 80])):
        p = r.choice(POOLS)
        k = r.choice([1, 1, 1, 2, 3, 6])
        out.append("".join(r.choice(p) for _ in range(k)) if r.random() < 0.7 else p[:k * 3])
    return "".join(out)


def tool(gguf: pathlib.Path, mode: str, lines: list[str]) -> list[list[str]]:
    p = subprocess.run([str(TOOL), str(gguf), mode], input="".join(x + "\n" for x in lines).encode(),
                       capture_output=True, check=True)
    return [ln.split("\t") for ln in p.stdout.decode().split("\n")[:len(lines)]]


def report(name: str, what: str, n: int, bad: list) -> int:
    print(f"{name:10s} {what:7s} {n} cases, {len(bad)} mismatches", flush=True)
    for b in bad[:3]:
        print("   ", b)
    return len(bad)


def fuzz(name: str, enc_sp, enc_plain, dec_sp, dec_plain, vocab: int, byte_ids: list[int], n: int, seed: int,
         nfc: bool, spm_kind: bool = False, unk: int = -1) -> int:
    gg = gen.TOK_OUT / f"{name}.gguf"
    r = random.Random(seed)
    texts = []
    while len(texts) < n:
        s = rand_str(r)
        if not (nfc and unicodedata.normalize("NFC", s) != s):  # moed does not NFC-normalize (nor llama.cpp)
            texts.append(s)
    bad = []
    for t, (c_sp, c_dec, c_plain) in zip(texts, tool(gg, "enc", [t.encode().hex() for t in texts])):
        want_sp, want_plain = " ".join(map(str, enc_sp(t))), " ".join(map(str, enc_plain(t)))
        # the special decode gives the text back; SPM reads U+2581 as a space
        # and puts a dummy space after control tokens, so there it must be
        # sentencepiece's decode, checked where no control token was parsed
        want_dec = t.encode() if not spm_kind else \
            dec_plain(enc_plain(t)).encode() if want_sp == want_plain else None
        if c_sp != want_sp or c_plain != want_plain or (want_dec is not None and bytes.fromhex(c_dec) != want_dec):
            bad.append((t, want_sp, c_sp, want_plain, c_plain))
    nbad = report(name, "encode", n, bad)
    # <unk> is left out: moed prints nothing for it (as HF's decode with
    # skip_special_tokens), sentencepiece prints " \u2047 "
    seqs = [[r.choice(byte_ids) if r.random() < 0.6 else r.choice([i for i in r.sample(range(vocab), 2) if i != unk])
             for _ in range(r.choice([1, 2, 3, 5, 10, 40]))] for _ in range(n)]
    bad = []
    for s, (c_sp, ok_sp, c_plain, ok_plain) in zip(seqs, tool(gg, "dec", [" ".join(map(str, s)) for s in seqs])):
        w_sp, w_plain = dec_sp(s), dec_plain(s)
        if ok_sp != "1" or ok_plain != "1" or (w_sp is not None and bytes.fromhex(c_sp) != w_sp.encode()) or \
                bytes.fromhex(c_plain) != w_plain.encode():
            bad.append((s, w_sp, bytes.fromhex(c_sp).decode(), w_plain, bytes.fromhex(c_plain).decode()))
    return nbad + report(name, "decode", n, bad)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if not TOOL.exists():
        sys.exit(f"{TOOL} missing: make CUDA=0 build/tests/tool_tokcmp")
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fam in gen.FAMILIES.items():
            d = gen.fetch(fam["pkg"], pathlib.Path(tmp) / name)
            tok = Tokenizer.from_file(str(d / fam["json"]))
            nfc = "NFC" in json.dumps(json.loads((d / fam["json"]).read_text()).get("normalizer"))
            byte_ids = [i for i in (tok.token_to_id(chr(gen_cp)) for gen_cp in range(0x21, 0x144)) if i is not None]

            def enc(t, special, tok=tok):
                tok.encode_special_tokens = not special
                return tok.encode(t, add_special_tokens=False).ids

            total += fuzz(name, lambda t: enc(t, True), lambda t: enc(t, False),
                          lambda s, tok=tok: tok.decode(s, skip_special_tokens=False),
                          lambda s, tok=tok: tok.decode(s, skip_special_tokens=True),
                          tok.get_vocab_size(with_added_tokens=True), byte_ids, n, seed, nfc)
        for name, fam in gen.SPM_FAMILIES.items():
            d = gen.fetch(fam["pkg"], pathlib.Path(tmp) / name)
            sp = spm.SentencePieceProcessor(model_file=str(d / fam["model"]))
            ctl = sorted((sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i)), key=len,
                         reverse=True)
            rx = re.compile("(" + "|".join(map(re.escape, ctl)) + ")")

            def enc_sp(t, sp=sp, rx=rx):
                ids = []
                for k, part in enumerate(rx.split(t)):
                    if k % 2:
                        ids.append(sp.piece_to_id(part))
                    elif part:
                        ids += sp.encode(part)
                return ids

            # SPM's special decode has no independent reference (sentencepiece
            # never prints control pieces); only its stream is checked
            total += fuzz(name, enc_sp, lambda t, sp=sp: sp.encode(t), lambda s: None,
                          lambda s, sp=sp: sp.decode(s), sp.vocab_size(),
                          [i for i in range(sp.vocab_size()) if sp.is_byte(i)], n, seed, False, True,
                          sp.unk_id())
    print("mismatches:", total)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
