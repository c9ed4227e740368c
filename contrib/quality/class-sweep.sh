#!/bin/sh
# class-sweep.sh KLI MODEL TEXT WORKDIR [TYPES]
#
# The measurement behind the recipes of kli quantize (src/quantize.c, doc/quality.md): each
# tensor class of kimi-linear-nano quantized alone to each candidate type, everything else
# f32, scored by mean KLD against the f32 copy. Prints "class type kld bits" lines, bits
# being the class's stored bits per weight as kli info reports them.
set -eu
kli=$1 model=$2 text=$3 work=$4
types=${5:-"q2_k q3_k q4_k q5_k q6_k q8_0"}
mkdir -p "$work"
"$kli" quantize -m "$model" -o "$work/f32" --type f32 --force 2>/dev/null
"$kli" perplexity -m "$work/f32" -f "$text" --ctx 512 -t 1 --kld-base "$work/base.kld" \
    >/dev/null 2>&1
# class name, glob (fnmatch, '*' crosses dots), kli info's class label
while read -r cls glob label; do
    for t in $types; do
        "$kli" quantize -m "$model" -o "$work/one" --type f32 --keep "$glob=$t" --force \
            2>/dev/null
        kld=$("$kli" perplexity -m "$work/one" -f "$text" --ctx 512 -t 1 --json \
              --kld-base "$work/base.kld" 2>/dev/null |
              sed -n 's/.*"kld_mean": \([^,]*\),.*/\1/p')
        bits=$("$kli" info -m "$work/one" | sed -n "s/.* $label \([0-9.]*\) (.*/\1/p")
        echo "$cls $t $kld $bits"
    done
done <<'CLASSES'
experts *.block_sparse_moe.experts.* experts
shared *.shared_experts.* expert
attn_kda model.layers.[012].self_attn.*proj*.weight KDA attention
attn_mla model.layers.3.self_attn.*proj*.weight MLA attention
dense model.layers.0.mlp.* ffn
router *.block_sparse_moe.gate.weight router
embed model.embed_tokens.weight embeddings
lm_head lm_head.weight lm_head
CLASSES
