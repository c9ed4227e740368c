#!/usr/bin/env python3
"""bpe.py - a byte-level BPE vocabulary in Kimi's tiktoken format, trained on a corpus.

The text is cut with Kimi's split pattern (doc/formats.md 1.4; the `regex` module has the
class intersection it needs), special-token strings are taken out first, and merges are
learned over the pieces' bytes: each merge joins the most frequent adjacent pair (ties:
the pair whose joined bytes sort first). Rank = token id = merge priority, as tiktoken wants:
ranks 0..255 are the single bytes in GPT-2's bytes_to_unicode order (as in Kimi's file),
then the merges in the order they were learned. The 256 special slots follow the ranks with
Kimi-Linear's names and layout ([BOS] first, <|im_end|> third, [PAD] last).

  bpe.py train CORPUS.jsonl N_RANKS OUT_DIR     writes tiktoken.model, tokenizer_config.json
"""
import base64
import collections
import json
import os
import sys

import regex

PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# Kimi-Linear's named special slots, by offset from the first special id (doc/formats.md 1.3)
SPECIALS = {0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True),
            3: ("<|im_user|>", True), 4: ("<|im_assistant|>", True),
            6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
            9: ("[EOT]", True), 10: ("<|im_system|>", True),
            11: ("<|tool_calls_section_begin|>", False),
            12: ("<|tool_calls_section_end|>", False), 13: ("<|tool_call_begin|>", False),
            14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False),
            17: ("<|im_middle|>", True), 254: ("[UNK]", True), 255: ("[PAD]", True)}


def byte_order():
    """The 256 bytes in GPT-2 bytes_to_unicode order: printable ones first, then the rest."""
    first = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    rest = [b for b in range(256) if b not in set(first)]
    return first + rest


def special_names(n_base):
    return {n_base + k: v[0] for k, v in SPECIALS.items()}


def special_strings():
    return [v[0] for v in SPECIALS.values()]


def pieces(text, counts):
    """Add the regex pieces of the ordinary text segments of `text` to `counts`."""
    segs = [text]
    for s in special_strings():
        segs = [p for seg in segs for p in seg.split(s)]
    for seg in segs:
        for m in regex.finditer(PATTERN, seg, flags=regex.V1):
            counts[m.group(0).encode()] += 1


def train(counts, n_ranks):
    order = byte_order()
    rank_of_byte = {b: i for i, b in enumerate(order)}
    tokens = [bytes([b]) for b in order]
    words = [[rank_of_byte[b] for b in w] for w in counts]
    freq = list(counts.values())
    pairs = collections.Counter()
    where = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pairs[(a, b)] += freq[wi]
            where[(a, b)].add(wi)
    while len(tokens) < n_ranks and pairs:
        c = max(pairs.values())
        if c <= 0:
            break
        a, b = min((p for p, v in pairs.items() if v == c),
                   key=lambda p: tokens[p[0]] + tokens[p[1]])
        new = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        for wi in list(where[(a, b)]):
            w = words[wi]
            f = freq[wi]
            for x, y in zip(w, w[1:]):
                pairs[(x, y)] -= f
                if pairs[(x, y)] == 0:
                    del pairs[(x, y)]
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for x, y in zip(out, out[1:]):
                pairs[(x, y)] += f
                where[(x, y)].add(wi)
        pairs.pop((a, b), None)
        where.pop((a, b), None)
    return tokens


def write(out, tokens):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tiktoken.model"), "w") as f:
        for r, t in enumerate(tokens):
            f.write("%s %d\n" % (base64.b64encode(t).decode(), r))
    n = len(tokens)
    dec = {}
    for k, (name, special) in sorted(SPECIALS.items()):
        dec[str(n + k)] = {"content": name, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": special}
    cfg = {"added_tokens_decoder": dec, "bos_token": "[BOS]", "eos_token": "[EOS]",
           "pad_token": "[PAD]", "unk_token": "[UNK]", "model_max_length": 1048576,
           "tokenizer_class": "TikTokenTokenizer"}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def main(argv):
    if len(argv) != 5 or argv[1] != "train":
        print(__doc__)
        return 2
    counts = collections.Counter()
    with open(argv[2]) as f:
        for line in f:
            pieces(json.loads(line), counts)
    tokens = train(counts, int(argv[3]))
    write(argv[4], tokens)
    print("%d ranks from %d distinct pieces" % (len(tokens), len(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
