#!/usr/bin/env python3
"""Hit rate of kli's GPU hot sets (--gpu-experts N) on a router trace.

Usage:
  contrib/tools/hotset-sim.py [--trace PATH] [--sizes 8,16,32,64,128] [--json]

The trace is JSON lines, one per decoded token: {"tok": i, "layers": [[ids], ...]}, the
format --gpu-profile reads. Per MoE layer N routed experts are resident; a routed
(token, expert) pair is a hit when its expert is. Three ways of choosing them:

  fixed     the lowest ids, never re-chosen
  live      what kli does with no profile: the lowest ids first, then every E routed slots
            of a layer up to eight experts whose count exceeds 2 x a resident one's + 4
            replace the coldest resident ones, and the counts halve (src/backend.c,
            bk_plan); swaps/token counts those replacements per scored token
  profile   --gpu-profile with the first half of the trace, scored on the second half
  oracle    the N most chosen experts of each layer over the scored half itself (the best
            any fixed set can do; an upper bound for profile)

Scores are over the second half of the trace for every policy, so they compare.
"""
import argparse
import json
import sys


def die(msg):
    print(f"hotset-sim: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path):
    toks = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    layers = json.loads(line)["layers"]
                except (ValueError, KeyError, TypeError) as e:
                    die(f"{path}:{n}: not a trace line ({e})")
                if not isinstance(layers, list) or not all(
                        isinstance(s, list) and all(type(e) is int and e >= 0 for e in s)
                        for s in layers):
                    die(f"{path}:{n}: 'layers' must be lists of expert ids")
                toks.append(layers)
    except OSError as e:
        die(f"cannot read {path}: {e}")
    if len(toks) < 2:
        die(f"{path}: needs at least two tokens")
    if len({len(t) for t in toks}) != 1:
        die(f"{path}: tokens differ in their number of layers")
    return toks


def top(counts, n):
    return set(sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:n])


def score(sets, toks):
    hit = tot = 0
    for layers in toks:
        for i, ids in enumerate(layers):
            tot += len(ids)
            hit += sum(e in sets[i] for e in ids)
    return hit / tot if tot else 0.0


def live(toks, warm, n, E):
    """@return (hit rate, swaps per scored token) of kli's re-choice (bk_plan)."""
    n_layers = len(toks[0])
    res = [set(range(n)) for _ in range(n_layers)]
    cnt = [[0] * E for _ in range(n_layers)]
    since = [0] * n_layers
    hit = tot = moved = 0
    for t, layers in enumerate(toks):
        for i, ids in enumerate(layers):
            if t >= warm:
                tot += len(ids)
                hit += sum(e in res[i] for e in ids)
            for e in ids:
                cnt[i][e] += 1
            since[i] += len(ids)
            if since[i] >= E:
                order = sorted(range(E), key=lambda e: (-cnt[i][e], e))
                cold = [v for v in reversed(order[n:]) if v in res[i]]
                swaps = 0
                for c in order[:n]:
                    if c in res[i]:
                        continue
                    if swaps == len(cold) or swaps == 8 or \
                            cnt[i][c] <= 2 * cnt[i][cold[swaps]] + 4:
                        break
                    res[i].discard(cold[swaps])
                    res[i].add(c)
                    swaps += 1
                if t >= warm:
                    moved += swaps
                cnt[i] = [c // 2 for c in cnt[i]]
                since[i] = 0
    scored = len(toks) - warm
    return (hit / tot if tot else 0.0), (moved / scored if scored else 0.0)


def main():
    ap = argparse.ArgumentParser(description="GPU hot-set hit rates on a router trace.")
    ap.add_argument("--trace", default="/work/shared/data/routing-trace-kimi-linear-300.jsonl")
    ap.add_argument("--sizes", default="8,16,32,64,128")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        die(f"--sizes {a.sizes}: expected counts like 8,16,32")
    if any(n < 1 or n > a.experts for n in sizes):
        die(f"--sizes must lie in 1..{a.experts}")
    toks = load(a.trace)
    E = a.experts
    if any(e >= E for layers in toks for s in layers for e in s):
        die(f"the trace names experts beyond --experts {E}")
    half = len(toks) // 2
    first, second = toks[:half], toks[half:]
    n_layers = len(toks[0])

    def counts(part):
        c = [[0] * E for _ in range(n_layers)]
        for layers in part:
            for i, ids in enumerate(layers):
                for e in ids:
                    c[i][e] += 1
        return c

    c1, c2 = counts(first), counts(second)
    rows = []
    for n in sizes:
        lv, sw = live(toks, half, n, E)
        rows.append({"experts": n, "share": n / E,
                     "fixed": score([set(range(n))] * n_layers, second),
                     "live": lv, "swaps_per_token": sw,
                     "profile": score([top(c, n) for c in c1], second),
                     "oracle": score([top(c, n) for c in c2], second)})
    if a.json:
        print(json.dumps({"trace": a.trace, "tokens": len(toks), "scored": len(second),
                          "layers": n_layers, "rows": rows}))
        return
    print(f"{a.trace}: {len(toks)} tokens, {n_layers} MoE layers; scored on the last "
          f"{len(second)}")
    print(f"{'experts':>8} {'share':>6} {'fixed':>7} {'live':>7} {'swaps/tok':>10} "
          f"{'profile':>8} {'oracle':>7}")
    for r in rows:
        print(f"{r['experts']:>8} {100 * r['share']:>5.1f}% {100 * r['fixed']:>6.1f}% "
              f"{100 * r['live']:>6.1f}% {r['swaps_per_token']:>10.2f} "
              f"{100 * r['profile']:>7.1f}% {100 * r['oracle']:>6.1f}%")


if __name__ == "__main__":
    main()
