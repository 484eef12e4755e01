#!/bin/bash
# Fresh clone -> `make demo` -> first page and index-ready times; then a second start (README).
#   bash benchmarks/demo_timing.sh      (needs port 7860 free; builds the default index once)
set -u
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rm -rf /tmp/democlone && git clone -q "$repo" /tmp/democlone && cd /tmp/democlone
t0=$(date +%s)
setsid make demo > /tmp/demo.log 2>&1 &
until curl -s -o /dev/null http://127.0.0.1:7860/; do sleep 2; done
t1=$(date +%s); echo "first start: page after $((t1-t0)) s"
until grep -q "index ready" /tmp/demo.log; do
  sleep 5
  if grep -q "build failed\|Traceback" /tmp/demo.log; then echo FAILED; exit 1; fi
done
t2=$(date +%s); echo "first start: index ready after $((t2-t0)) s"
pkill -f "attribution demo"; sleep 3
t0=$(date +%s)
setsid make demo > /tmp/demo2.log 2>&1 &
until curl -s -o /dev/null http://127.0.0.1:7860/; do sleep 1; done
t1=$(date +%s); echo "second start: page after $((t1-t0)) s"
pkill -f "attribution demo"
