"""gguf_read.py - a GGUF v3 reader written from the format's description alone, sharing no
code with kli (weights/gguf.c) or with llama.cpp: tests/gguf-llama.sh reads with it the files
`kli convert --to gguf` writes and the files of tests/data/gguf/llama that llama.cpp's own
converter and ggml's quantizers wrote, and compares them.

    python3 gguf_read.py MINE THEIRS [BOUND]

MINE and THEIRS must parse in full (every offset, size and alignment checked); they must
have the same tensor names and shapes (but trailing ones) and the same kimi-linear.*
metadata (rope.freq_base aside) and vocabulary; every tensor
both hold in a type this reader decodes (F32, F16, BF16, Q8_0, Q4_K) must be within
relative L2 BOUND (default 1e-6) of the other's values.
"""
import struct
import sys

import numpy as np

# ggml type: (name, elements per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
         11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
         14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18), 30: ("BF16", 1, 2)}
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
          11: "<q", 12: "<d"}


class Reader:
    def __init__(self, path):
        self.path = path
        self.b = open(path, "rb").read()
        self.p = 0
        if self.take(4) != b"GGUF":
            raise ValueError("%s: not a GGUF file" % path)
        version, n_t, n_kv = self.unpack("<I"), self.unpack("<Q"), self.unpack("<Q")
        if version != 3:
            raise ValueError("%s: GGUF version %d" % (path, version))
        self.kv = {}
        for _ in range(n_kv):
            key = self.string()
            if key in self.kv:
                raise ValueError("%s: key %s twice" % (path, key))
            self.kv[key] = self.value(self.unpack("<I"))
        align = self.kv.get("general.alignment", 32)
        if align <= 0 or align & (align - 1):
            raise ValueError("%s: alignment %d" % (path, align))
        infos = []
        for _ in range(n_t):
            name = self.string()
            ne = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
            infos.append((name, ne, self.unpack("<I"), self.unpack("<Q")))
        base = -(-self.p // align) * align
        self.tensors, spans = {}, []
        for name, ne, typ, off in infos:
            if typ not in TYPES or off % align:
                raise ValueError("%s: %s: type %d at offset %d" % (path, name, typ, off))
            tname, blk, size = TYPES[typ]
            numel = int(np.prod(ne))
            if ne[0] % blk:
                raise ValueError("%s: %s: rows of %d in %s" % (path, name, ne[0], tname))
            nbytes = numel // blk * size
            if base + off + nbytes > len(self.b) or name in self.tensors:
                raise ValueError("%s: %s: past the end, or twice" % (path, name))
            spans.append((off, off + nbytes, name))
            self.tensors[name] = (tname, ne, self.b[base + off:base + off + nbytes])
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ValueError("%s: %s overlaps %s" % (path, an, bn))

    def take(self, n):
        if self.p + n > len(self.b):
            raise ValueError("%s: truncated at byte %d" % (self.path, self.p))
        self.p += n
        return self.b[self.p - n:self.p]

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return self.take(self.unpack("<Q")).decode("utf-8")

    def value(self, typ):
        if typ in SCALAR:
            return self.unpack(SCALAR[typ])
        if typ == 8:
            return self.string()
        if typ == 9:
            elem, n = self.unpack("<I"), self.unpack("<Q")
            return [self.value(elem) for _ in range(n)]
        raise ValueError("%s: value type %d" % (self.path, typ))

    def values(self, name):
        """The tensor's values as float32 (fastest dimension last), or None for a type this
        reader does not decode."""
        tname, ne, raw = self.tensors[name]
        if tname == "F32":
            v = np.frombuffer(raw, "<f4")
        elif tname == "F16":
            v = np.frombuffer(raw, "<f2").astype(np.float32)
        elif tname == "BF16":
            v = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif tname == "Q8_0":
            blk = np.frombuffer(raw, np.uint8).reshape(-1, 34)
            d = blk[:, :2].copy().view("<f2").astype(np.float32)
            v = d * blk[:, 2:].view(np.int8).astype(np.float32)
        elif tname == "Q4_K":
            v = q4_k(np.frombuffer(raw, np.uint8).reshape(-1, 144))
        else:
            return None
        return v.reshape(list(reversed(ne)))


def q4_k(blk):
    """Q4_K super-blocks: FP16 d and dmin, 12 bytes of eight 6-bit scales and mins, then
    128 bytes of nibbles: each 32 bytes hold two sub-blocks of 32, low nibbles first."""
    d = blk[:, 0:2].copy().view("<f2").astype(np.float32)
    dmin = blk[:, 2:4].copy().view("<f2").astype(np.float32)
    s = blk[:, 4:16].astype(np.int32)
    sc = np.empty((len(blk), 8), np.int32)
    mn = np.empty((len(blk), 8), np.int32)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = blk[:, 16:].reshape(-1, 4, 32).astype(np.int32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)
    return (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]


def squeeze(ne):
    """The dimensions but trailing ones (ggml drops them when it writes a tensor)."""
    ne = list(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return ne


def rel_l2(a, b):
    n = np.linalg.norm(b.astype(np.float64))
    return np.linalg.norm(a.astype(np.float64) - b) / (n if n > 0 else 1)


def main():
    mine, theirs = Reader(sys.argv[1]), Reader(sys.argv[2])
    bound = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-6
    bad = []
    if sorted(mine.tensors) != sorted(theirs.tensors):
        bad.append("tensor names: %s" % sorted(set(mine.tensors) ^ set(theirs.tensors)))
    compared, worst = 0, (0.0, "")
    for name in sorted(set(mine.tensors) & set(theirs.tensors)):
        if squeeze(mine.tensors[name][1]) != squeeze(theirs.tensors[name][1]):
            bad.append("%s: shape %s, theirs %s" % (name, mine.tensors[name][1],
                                                    theirs.tensors[name][1]))
            continue
        a, b = mine.values(name), theirs.values(name)
        if a is not None and b is not None:
            a, b = a.ravel(), b.ravel()
            compared += 1
            e = rel_l2(a, b)
            worst = max(worst, (e, name))
    if worst[0] > bound:
        bad.append("%s: rel L2 %.3g > %g" % (worst[1], worst[0], bound))
    keys = [k for k in theirs.kv
            if k.startswith("kimi-linear.") and k != "kimi-linear.rope.freq_base"]
    for k in keys:
        if mine.kv.get(k) != theirs.kv[k]:
            bad.append("%s: %r, theirs %r" % (k, mine.kv.get(k), theirs.kv[k]))
    for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
              "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        if mine.kv.get(k) != theirs.kv.get(k):
            bad.append("%s differs" % k)
    print("%d tensors, %d compared (worst rel L2 %.3g, %s), %d kimi-linear keys; %s"
          % (len(mine.tensors), compared, worst[0], worst[1], len(keys),
             "; ".join(bad[:4]) if bad else "all the same"))
    return 1 if bad or compared == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
