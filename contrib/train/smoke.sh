#!/bin/sh
# The first GPU call: the forward check against kimi_ref.py, a short timed training run, the
# golden writer on its output, and the tokenizer's ids for a piece of held-out text.
set -e
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 train.py check
python3 train.py train "$OUT/smoke" --steps 30 --batch 64 --log-every 10 --eval-tokens 4000
python3 train.py train /tmp/smoke2 --steps 20 --batch 192 --log-every 10 --heldout ''
python3 train.py golden "$OUT/smoke" "$OUT/smoke" --decode 4
python3 ../reference/kimi_ref.py logits "$OUT/smoke" \
    "$(python3 -c "import json;g=json.load(open('$OUT/smoke/golden.json'));print(','.join(map(str,g['prompt'])))")" \
    /tmp/ref.f32
python3 ../reference/kimi_ref.py compare "$OUT/smoke/ref64_prefill.f32" /tmp/ref.f32 2304 1e-9
python3 -c "
import sys; sys.argv=['x']; import train
enc,_=train.tokenizer(train.NANO_DIR)
t=open('data/heldout.txt').read()[:3000]
open('$OUT/smoke/heldout.txt','w').write(t)
open('$OUT/smoke/heldout.ids','w').write(' '.join(map(str,enc.encode_ordinary(t))))
"
