# contrib/bench/lib.sh - what the benchmark scripts here share; they source it:
#   . "$(dirname "$0")/lib.sh"

# median FILE: the median of the numbers in FILE, one a line ("nan" when it has none)
median() {
    sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan";
        else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
