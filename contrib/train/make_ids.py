#!/usr/bin/env python3
"""make_ids.py - tokenize the prepared corpus with kli itself, for train.py --ids.

  make_ids.py KLI_BINARY DATA_DIR

Writes DATA_DIR/train.ids (int32 LE: every document of train.jsonl in file order, a plain
one followed by [EOS], a chat one as rendered, special-token strings as their ids),
DATA_DIR/heldout.ids (heldout.txt as plain text) and DATA_DIR/golden.ids (the golden
prompt of train.py, text). The tokenizer is contrib/models/kimi-linear-nano's.
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MODEL = os.path.join(os.path.dirname(HERE), "models", "kimi-linear-nano")


def tokenize(kli, path, special):
    cmd = [kli, "tokenize", "-m", MODEL, "-f", path] + (["--special"] if special else [])
    return np.array(subprocess.run(cmd, check=True, capture_output=True).stdout.split(),
                    dtype="<i4")


def main(kli, d):
    joined = os.path.join(d, "train-special.txt")
    with open(os.path.join(d, "train.jsonl")) as f, open(joined, "w") as out:
        for line in f:
            doc = json.loads(line)
            out.write(doc if doc.startswith("<|im_system|>") else doc + "[EOS]")
    tokenize(kli, joined, True).tofile(os.path.join(d, "train.ids"))
    os.unlink(joined)
    tokenize(kli, os.path.join(d, "heldout.txt"), False).tofile(os.path.join(d, "heldout.ids"))
    # golden.ids is text (one line of ids), as train.py golden --prompt-ids reads it
    import golden_prompt
    g = os.path.join(d, "golden.txt")
    with open(g, "w") as f:
        f.write(golden_prompt.GOLDEN_PLAIN + golden_prompt.GOLDEN_TEXT)
    ids = tokenize(kli, g, True)
    os.unlink(g)
    with open(os.path.join(d, "golden.ids"), "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2])
