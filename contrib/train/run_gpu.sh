#!/bin/sh
# The GPU run that made contrib/models/kimi-linear-nano, in one call: the forward check
# against kimi_ref.py, a 12-step timing run, the training run (its step count from the
# timing unless STEPS is set, so that it fits MINUTES; the count it used is printed and
# written to curve.tsv, and STEPS=that count reproduces the run), and the float64 golden
# logits of the stored weights. Inputs (see README.md beside the model):
#   data/train.ids data/heldout.ids data/golden.ids   kli tokenize output, as int32 / text
set -e
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
O=${OUT:-/tmp/out}
mkdir -p "$O"
B=${BATCH:-128}
nvidia-smi --query-gpu=name --format=csv,noheader || true
python3 train.py check
if [ -z "${STEPS:-}" ]; then
    python3 train.py train /tmp/timing --ids data/train.ids --steps 12 --batch "$B" \
        --log-every 1 --heldout ''
    STEPS=$(python3 -c "
import sys
r = [l.split() for l in open('/tmp/timing/curve.tsv')][1:]
dt = (float(r[-1][2]) - float(r[1][2])) / (len(r) - 2)
print(int(${MINUTES:-6.5} * 60 / dt))")
fi
echo "STEPS=$STEPS BATCH=$B"
python3 train.py train "$O" --ids data/train.ids --heldout-ids data/heldout.ids \
    --steps "$STEPS" --batch "$B" --log-every 50 2>&1 | tee "$O/train.log"
python3 train.py golden "$O" "$O" --prompt-ids data/golden.ids --decode 16
