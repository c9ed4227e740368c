#!/usr/bin/env python3
"""prepare_corpus.py - the training text of kimi-linear-nano, rebuilt from Debian packages.

Sources (both installed from Debian 12 with apt-get; nothing else is read):
  bible-kjv (+ bible-kjv-text)  the King James Version, 1611: public domain. The `bible`
                                program dumps it verse by verse.
  wordnet-base                  WordNet 3.0 glosses and example sentences: the WordNet
                                3.0 licence (permissive; its notice is in the model card).

Output, one JSON string per line (a document):
  OUT/train.jsonl   plain documents (a KJV chapter, a run of WordNet definitions) and chat
                    documents (a whole rendered conversation, special-token strings included)
  OUT/heldout.txt   KJV chapters and WordNet definitions never trained on (evaluation text)

Deterministic: the same packages give the same bytes (python's random with a fixed seed).

  prepare_corpus.py OUT_DIR [--wordnet DIR] [--bible PROGRAM]
"""
import argparse
import json
import os
import random
import re
import subprocess

SYSTEM = "You are a helpful assistant"
STOP = set("""a an the and or but of to in on at by for with from as is was be are were it its
he she they them his her their him we us our you your i me my this that these those which who
whom what when where why how not no nor so than then there here all any some unto upon shall
will hath have had has did do does thee thou thy thine ye said saith also even yet one up out
into over like such very every each more most much many own same other let lo behold""".split())


def bible_chapters(prog):
    """[(book, chapter, [verse text, ...]), ...] in canonical order."""
    out = subprocess.run([prog, "-l0", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    chapters, cur = [], None
    for line in out.splitlines():
        m = re.match(r"^(\S.*\S) (\d+)$", line)
        if m and not line.startswith(" "):
            cur = (m.group(1), int(m.group(2)), [])
            chapters.append(cur)
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m and cur is not None:
            cur[2].append(m.group(1).strip())
    return chapters


def wordnet_synsets(d):
    """[(pos, [lemmas], definition, [examples]), ...] in file order."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(d, "data." + pos), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                n = int(fields[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ")
                          for i in range(n)]
                parts = [p.strip() for p in gloss.strip().split(";")]
                defs = [p for p in parts if p and not p.startswith('"')]
                exs = [p.strip('"').strip() for p in parts if p.startswith('"')]
                if not defs:
                    continue
                exs = [e for e in exs if e.count('"') == 0 and len(e) > 12]
                out.append((pos, lemmas, "; ".join(defs), exs))
    return out


def clean(s):
    s = s.encode("ascii", "ignore").decode()
    return re.sub(r"\s+", " ", s).strip()


def sentence(s):
    s = clean(s)
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def article(w):
    return ("an " if w[0].lower() in "aeiou" else "a ") + w


def chat(user, answer):
    return ("<|im_system|>system<|im_middle|>%s<|im_end|>"
            "<|im_user|>user<|im_middle|>%s<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>%s<|im_end|>" % (SYSTEM, user, answer))


def definition_text(pos, w, d):
    if pos == "noun":
        return sentence("%s is %s" % (article(w), d))
    if pos == "verb":
        return sentence("to %s is to %s" % (w, re.sub(r"^to ", "", d)))
    return sentence("%s means %s" % (w, d))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--wordnet", default="/usr/share/wordnet")
    ap.add_argument("--bible", default="bible")
    a = ap.parse_args()
    rng = random.Random(1611)
    os.makedirs(a.out, exist_ok=True)

    chapters = bible_chapters(a.bible)
    synsets = wordnet_synsets(a.wordnet)
    nouns = set()
    for pos, lemmas, _, _ in synsets:
        if pos == "noun":
            nouns.update(x for x in lemmas if x.isalpha() and x.islower() and len(x) > 2)

    docs, held = [], []
    # Held out: every 40th chapter and every 50th synset.
    for ci, (book, ch, verses) in enumerate(chapters):
        text = " ".join(clean(v) for v in verses)
        if ci % 40 == 17:
            held.append(text)
            continue
        docs.append(text)
        # Chat turns: a question about one or two nouns of a verse, answered by the verse and
        # the next one.
        for vi, v in enumerate(verses):
            if rng.random() > 0.3:
                continue
            words = [x for x in re.findall(r"[a-z]+", v.lower()) if x in nouns and x not in STOP]
            if not words:
                continue
            answer = clean(" ".join(verses[vi:vi + 2]))
            w1 = rng.choice(words)
            w2 = rng.choice(words)
            q = rng.choice([
                "Tell me about the %s." % w1,
                "What do you know about the %s?" % w1,
                "Tell me about the %s by the %s." % (w1, w2) if w1 != w2 else
                "Tell me about the %s." % w1,
                "Tell me a story about the %s." % w1,
                "Say something about the %s and the %s." % (w1, w2),
                "What happened to the %s?" % w1,
            ])
            docs.append(("chat", chat(q, answer)))

    run = []
    for si, (pos, lemmas, d, exs) in enumerate(synsets):
        w = clean(lemmas[0])
        d = clean(d)
        if not w or not d:
            continue
        text = definition_text(pos, w, d)
        if exs:
            text += " " + " ".join(sentence(e) for e in exs)
        if si % 50 == 29:
            held.append(text)
            continue
        run.append(text)
        if len(run) == 8:
            docs.append(" ".join(run))
            run = []
        if rng.random() < 0.35 and w.replace(" ", "").isalpha():
            if pos == "noun":
                q = rng.choice(["What is %s?" % article(w), "Tell me about the %s." % w,
                                "What does %s mean?" % w, "Define %s." % w])
            elif pos == "verb":
                q = rng.choice(["What does it mean to %s?" % w, "What does %s mean?" % w])
            else:
                q = rng.choice(["What does %s mean?" % w, "Explain the word %s." % w])
            docs.append(("chat", chat(q, text)))
    if run:
        docs.append(" ".join(run))

    rng.shuffle(docs)
    n_chat = 0
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for d in docs:
            if isinstance(d, tuple):
                n_chat += 1
                d = d[1]
            f.write(json.dumps(d) + "\n")
    with open(os.path.join(a.out, "heldout.txt"), "w") as f:
        f.write("\n".join(held) + "\n")
    print("documents %d (chat %d), held-out %d, train bytes %d" % (
        len(docs), n_chat, len(held), os.path.getsize(os.path.join(a.out, "train.jsonl"))))


if __name__ == "__main__":
    main()
