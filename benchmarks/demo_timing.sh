#!/bin/bash
# Fresh clone -> `make demo` -> page up, first answer (polling /attribute_generated with
# gradio_client until proponents come back: partial while the index is built), index ready;
# then a second start (README, "Quick start").
#   bash benchmarks/demo_timing.sh      (needs port 7860 free; builds the default index once)
#   FIRST_ONLY=1 bash benchmarks/demo_timing.sh   (stops at the first answer)
set -u
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rm -rf /tmp/democlone && git clone -q "$repo" /tmp/democlone && cd /tmp/democlone
stop() { kill -- -"$1" 2>/dev/null; sleep 3; }  # the process group started by setsid below
t0=$(date +%s)
setsid make demo > /tmp/demo.log 2>&1 &
pid=$!
until curl -s -o /dev/null http://127.0.0.1:7860/; do
  sleep 2
  if ! kill -0 $pid 2>/dev/null; then echo "FAILED: make demo exited"; tail /tmp/demo.log; exit 1; fi
done
t1=$(date +%s); echo "first start: page after $((t1-t0)) s"
# one query every 10 s until an answer has proponents; each line: seconds since `make demo`, what came back
T0=$t0 .venv/bin/python - <<'PY'
import os, time
from gradio_client import Client
t0 = float(os.environ["T0"])
c = Client("http://127.0.0.1:7860/", verbose=False)
while True:
    try:
        r = c.predict(0, "ddim", 50, 8, None, api_name="/attribute_generated")
        if r.get("proponents"):
            p = r.get("partial")
            what = f"partial: {p['indexed']} of {p['of']} images indexed" if p else "the whole index"
            print(f"first start: first answer after {time.time() - t0:.0f} s ({what}; top proponent id "
                  f"{r['proponents'][0]['row']}; query {sum(r['timings_s'].values()):.1f} s)", flush=True)
            break
    except Exception as e:
        print(f"  {time.time() - t0:.0f} s: {str(e).splitlines()[0][:150]}", flush=True)
    time.sleep(10)
PY
if [ -n "${FIRST_ONLY:-}" ]; then stop $pid; exit 0; fi  # FIRST_ONLY=1: stop at the first answer
until grep -q "index ready" /tmp/demo.log; do
  sleep 5
  if grep -q "build failed\|Traceback" /tmp/demo.log; then echo FAILED; tail /tmp/demo.log; exit 1; fi
done
t2=$(date +%s); echo "first start: index ready after $((t2-t0)) s"
stop $pid
t0=$(date +%s)
setsid make demo > /tmp/demo2.log 2>&1 &
pid=$!
until curl -s -o /dev/null http://127.0.0.1:7860/; do sleep 1; done
t1=$(date +%s); echo "second start: page after $((t1-t0)) s"
stop $pid
