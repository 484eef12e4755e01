#!/bin/bash
# What `make demo` installs (the venv's size, before any index is built), at a base commit and at
# HEAD, each from a fresh clone (issue 17: "installs at least 100 MB less").
#   bash benchmarks/install_size.sh [BASE]      (BASE: default 5169b49, the commit issue 17 was filed at)
set -eu
base=${1:-5169b49}
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
out="$repo/benchmarks/results/install_size.json"
declare -A size
for rev in "$base" HEAD; do
  dir=/tmp/install-size-$rev
  rm -rf "$dir" && git clone -q "$repo" "$dir" && git -C "$dir" checkout -q "$(git -C "$repo" rev-parse "$rev")"
  (cd "$dir" && make -s install > /tmp/install-size-$rev.log 2>&1)
  size[$rev]=$(du -sb "$dir/.venv" | cut -f1)
  echo "$rev: $((size[$rev] / 1000000)) MB in .venv"
  rm -rf "$dir"
done
b=${size[$base]}; h=${size[HEAD]}
saved=$(( (b - h) / 1000000 ))
echo "HEAD installs $saved MB less than $base"
printf '{"base": "%s", "head": "%s", "base_bytes": %s, "head_bytes": %s, "saved_mb": %s}\n' \
  "$base" "$(git -C "$repo" rev-parse --short HEAD)" "$b" "$h" "$saved" > "$out"
