#!/usr/bin/env python3
"""Simulate a bounded routed-expert cache ("edge mode") on a router trace.

Usage:
  contrib/tools/xcache-sim.py [--trace PATH] [--sizes 0.02,0.05,...]
                              [--warmup N] [--lfu-halve N] [--json]

The trace is JSON lines, one per decoded token:
  {"tok": i, "layers": [[top-k expert ids] for each MoE layer]}
A cache slot holds one (layer, expert) pair; sizes are fractions of all
layers*256 pairs.  Per token, layers are visited in order and each layer
requests its k experts.  A miss loads the expert, evicting a victim that is
not among the current layer's experts (if there is none, e.g. a per-layer
share smaller than k, the expert is used without being cached).

Policies:
  lru        global least-recently-used
  lfu        least-frequently-used; counts (kept for every pair ever seen)
             are halved every --lfu-halve requests; ties -> least recent
  lru-layer  slots split evenly per layer, LRU within each layer
  2q         simplified 2Q (Johnson & Shasha): new pairs enter a FIFO
             (A1in, 25% of slots); pairs evicted from it are remembered in a
             ghost list (A1out, 50% of slots, keys only); a miss on a ghost
             goes to the main LRU (Am).  Pairs used once do not flush Am.
  opt        Belady's MIN (evict the pair used farthest in the future)

Also printed: next-token repeat rate (share of a layer's experts at token t
already chosen by that layer at t-1, and at any of t-1..t-4) and per-layer
skew (share of a layer's requests served by its top 10% experts).
--warmup N excludes the first N tokens from the hit/miss counts only.
"""
import argparse
import heapq
import json
import sys
from collections import OrderedDict

N_EXPERTS = 256
DEFAULT_TRACE = "/work/shared/data/routing-trace-kimi-linear-300.jsonl"
POLICIES = ("lru", "lfu", "lru-layer", "2q", "opt")


def die(msg):
    print(f"xcache-sim: {msg}", file=sys.stderr)
    sys.exit(1)


def valid_layers(layers):
    return isinstance(layers, list) and layers and all(
        isinstance(s, list) and s
        and all(type(e) is int and 0 <= e < N_EXPERTS for e in s)
        and len(set(s)) == len(s) for s in layers)


def load_trace(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read trace {path}: {e}")
    toks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            layers = json.loads(line)["layers"]
        except (ValueError, KeyError, TypeError, IndexError):
            die(f"{path}:{n}: expected a JSON object with a 'layers' list")
        if not valid_layers(layers):
            die(f"{path}:{n}: 'layers' must be lists of distinct expert ids "
                f"in 0..{N_EXPERTS - 1}")
        shape = toks[0] if toks else layers
        if len(layers) != len(shape) or any(len(s) != len(shape[0]) for s in layers):
            die(f"{path}:{n}: inconsistent number of layers or experts")
        toks.append(layers)
    if not toks:
        die(f"{path}: no tokens in trace")
    return toks


def pick(q, prot):
    """Oldest key of ordered dict q that is not protected, or None."""
    return next((k for k in q if k not in prot), None)


class LRU:
    def __init__(self, cap):
        self.cap, self.q = cap, OrderedDict()

    def access(self, key, pos, prot):
        if key in self.q:
            self.q.move_to_end(key)
            return True
        if len(self.q) >= self.cap:
            victim = pick(self.q, prot)
            if victim is None:
                return False            # nothing evictable: bypass
            del self.q[victim]
        self.q[key] = None
        return False


class LRULayer:
    def __init__(self, cap, n_layers):
        self.parts = [LRU(cap // n_layers + (l < cap % n_layers)) for l in range(n_layers)]

    def access(self, key, pos, prot):
        return self.parts[key // N_EXPERTS].access(key, pos, prot)


class HeapCache:
    """Evicts the cached key with the smallest priority tuple (lazy heap)."""
    def __init__(self, cap):
        self.cap, self.cached, self.heap = cap, {}, []

    def place(self, key, prio, prot):
        hit = key in self.cached
        if not hit and len(self.cached) >= self.cap:
            kept, victim = [], None
            while self.heap and victim is None:
                e = heapq.heappop(self.heap)
                if self.cached.get(e[-1]) != e[:-1]:
                    continue            # stale entry
                if e[-1] in prot:
                    kept.append(e)
                else:
                    victim = e[-1]
            for e in kept:
                heapq.heappush(self.heap, e)
            if victim is None:
                return False
            del self.cached[victim]
        self.cached[key] = prio
        heapq.heappush(self.heap, prio + (key,))
        return hit


class LFU(HeapCache):
    def __init__(self, cap, halve):
        super().__init__(cap)
        self.halve, self.n, self.cnt = halve, 0, {}

    def access(self, key, pos, prot):
        # Adding 2**(n // halve) instead of 1 orders pairs exactly as halving
        # every count each `halve` requests would, without touching them all.
        self.cnt[key] = self.cnt.get(key, 0) + (1 << (self.n // self.halve))
        self.n += 1
        return self.place(key, (self.cnt[key], pos), prot)


class OPT(HeapCache):
    def __init__(self, cap, next_use):
        super().__init__(cap)
        self.next_use = next_use

    def access(self, key, pos, prot):
        return self.place(key, (-self.next_use[pos],), prot)


class TwoQ:
    def __init__(self, cap):
        self.cap, self.kin, self.kout = cap, max(1, cap // 4), cap // 2
        self.a1in, self.a1out, self.am = OrderedDict(), OrderedDict(), OrderedDict()

    def access(self, key, pos, prot):
        if key in self.am:
            self.am.move_to_end(key)
            return True
        if key in self.a1in:
            return True
        if len(self.a1in) + len(self.am) >= self.cap:
            order = [self.a1in, self.am] if len(self.a1in) > self.kin else [self.am, self.a1in]
            q, victim = next(((q, v) for q in order if (v := pick(q, prot)) is not None),
                             (None, None))
            if victim is None:
                return False
            del q[victim]
            if q is self.a1in:
                self.a1out[victim] = None
                if len(self.a1out) > self.kout:
                    self.a1out.popitem(last=False)
        if key in self.a1out:           # seen recently: straight to main LRU
            del self.a1out[key]
            self.am[key] = None
        else:
            self.a1in[key] = None
        return False


def simulate(policy, steps, warmup):
    hits = counted = 0
    for tok, keys, prot, start in steps:
        for i, key in enumerate(keys):
            hit = policy.access(key, start + i, prot)
            if tok >= warmup:
                counted += 1
                hits += hit
    return hits / counted


def repeat_rates(toks, k):
    """Mean share of experts also used at t-1, at t-1..t-4; mean size of that union."""
    r1 = [len(set(cur) & set(toks[t - 1][l])) / k
          for t in range(1, len(toks)) for l, cur in enumerate(toks[t])]
    r4, u4 = [], []
    for t in range(4, len(toks)):
        for l, cur in enumerate(toks[t]):
            u = set().union(*(toks[t - d][l] for d in range(1, 5)))
            r4.append(len(u.intersection(cur)) / k)
            u4.append(len(u))
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    return mean(r1), mean(r4), mean(u4)


def skew(toks):
    top, shares = max(1, round(N_EXPERTS / 10)), []
    for l in range(len(toks[0])):
        cnt = [0] * N_EXPERTS
        for tok in toks:
            for e in tok[l]:
                cnt[e] += 1
        shares.append(sum(sorted(cnt, reverse=True)[:top]) / sum(cnt))
    return sum(shares) / len(shares), top


def parse_sizes(s):
    try:
        sizes = [float(x) for x in s.split(",")]
        if all(0 < x <= 1 for x in sizes):
            return sizes
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("expected fractions in (0, 1], e.g. 0.05,0.1")


def main():
    ap = argparse.ArgumentParser(description="Simulate a routed-expert cache on a router trace.")
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--sizes", type=parse_sizes, default=[0.02, 0.05, 0.10, 0.20, 0.30, 0.50])
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--lfu-halve", type=int, default=None,
                    help="halve LFU counts every N requests (default layers*k*16)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    toks = load_trace(a.trace)
    n_layers, k = len(toks[0]), len(toks[0][0])
    total = n_layers * N_EXPERTS
    halve = n_layers * k * 16 if a.lfu_halve is None else a.lfu_halve
    if not 0 <= a.warmup < len(toks):
        die(f"--warmup must be in 0..{len(toks) - 1}")
    if halve < 1:
        die("--lfu-halve must be positive")

    steps, flat = [], []                # one step = one layer of one token
    for t, tok in enumerate(toks):
        for l, experts in enumerate(tok):
            keys = [l * N_EXPERTS + e for e in experts]
            steps.append((t, keys, frozenset(keys), len(flat)))
            flat.extend(keys)
    next_use, last = [0] * len(flat), {}
    for p in range(len(flat) - 1, -1, -1):
        next_use[p] = last.get(flat[p], len(flat))
        last[flat[p]] = p

    rows = []
    for frac in a.sizes:
        cap = max(1, round(frac * total))
        make = {"lru": lambda: LRU(cap), "lfu": lambda: LFU(cap, halve),
                "lru-layer": lambda: LRULayer(cap, n_layers),
                "2q": lambda: TwoQ(cap), "opt": lambda: OPT(cap, next_use)}
        rows.append({"size": frac, "slots": cap,
                     **{p: simulate(make[p](), steps, a.warmup) for p in POLICIES}})
    r1, r4, u4 = repeat_rates(toks, k)
    sk, top = skew(toks)

    if a.json:
        print(json.dumps({"trace": a.trace, "tokens": len(toks), "layers": n_layers,
                          "top_k": k, "experts_per_layer": N_EXPERTS,
                          "warmup": a.warmup, "lfu_halve": halve,
                          "distinct_pairs": len(last), "hit_rate": rows,
                          "repeat_rate_prev1": r1, "repeat_rate_prev4": r4,
                          "prev4_union_size": u4, "skew_top10pct": sk}))
        return
    print(f"trace {a.trace}: {len(toks)} tokens x {n_layers} layers x top-{k} "
          f"of {N_EXPERTS}; warmup {a.warmup} tokens; lfu halve every {halve}")
    print(f"distinct (layer, expert) pairs used: {len(last)} of {total}")
    print("\nhit rate (%)\n  size  slots" + "".join(f"{p:>10}" for p in POLICIES))
    for r in rows:
        print(f"{r['size']:6.2f} {r['slots']:6d}" +
              "".join(f"{100 * r[p]:10.1f}" for p in POLICIES))
    print(f"\nnext-token repeat rate: {100 * r1:.1f}% in t-1, {100 * r4:.1f}% in "
          f"t-1..t-4 (union of t-1..t-4 holds {u4:.1f} experts/layer)")
    print(f"per-layer skew: top {top} of {N_EXPERTS} experts serve "
          f"{100 * sk:.1f}% of a layer's requests (uniform: {100 * top / N_EXPERTS:.1f}%)")


if __name__ == "__main__":
    main()
