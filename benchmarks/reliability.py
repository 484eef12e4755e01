"""Fuzz and fault summary (issue 14): runs the reliability test modules and counts, per kind of
fault, the cases tried and how each ended: a clear error or the right answer (the test passed),
a traceback (an unexpected exception reached the test), a wrong answer (an assertion on the
result failed) or data lost (a failure in a test that guards files: a finished index, a resumed
build, files outside the export folder).

    python benchmarks/reliability.py                 # every module below; writes benchmarks/results/reliability.json
    python benchmarks/reliability.py --quick         # without the slow modules (CLI processes, SIGKILLs, app)

The image fuzz test checks a few hundred generated files inside one test; its own counts
(tried / clear errors / converted) are read from its output and reported as cases.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (kind of fault, pytest target, guards data: a failure there counts as data lost, slow)
SUITES = [
    ("corrupt, odd and hostile images", "tests/test_data_fuzz.py", False, False),
    ("damaged and mismatched index files", "tests/test_index_integrity.py", False, False),
    ("bad build settings, read-only and full disks", "tests/test_index_errors.py", False, False),
    ("build into a folder holding an index", "tests/test_index_folder.py", True, False),
    ("SIGKILL at each build stage, then resume", "tests/test_index_resume.py", True, True),
    ("retrieve-and-rerank files: damaged, killed, resumed", "tests/test_index_rerank.py", True, True),
    ("an index of another model family or class map", "tests/test_index_conditional.py", False, False),
    ("bad CLI arguments, model folders, outputs", "tests/test_cli_errors.py", False, True),
    ("export clean-up with planted links", "tests/test_exports.py", True, False),
    ("launcher: flags, environment, decoders", "tests/test_launch.py", False, False),
    (
        "hostile API calls and concurrent clients",
        "tests/test_app.py -k refuse or url or eps or bad or concurrent or converts or missing_k",
        False,
        True,
    ),
]
COLUMNS = ("tried", "clear error or right answer", "traceback", "wrong answer", "data lost", "skipped")
FUZZ = re.compile(r"fuzz: (\d+) tried, (\d+) clear errors, (\d+) converted; .*failures: (\d+)")


def _outcome(case: ET.Element, guards_data: bool) -> str:
    if case.find("skipped") is not None:
        return "skipped"
    bad = case.find("failure")
    if bad is None:
        bad = case.find("error")
    if bad is None:
        return "clear error or right answer"
    text = (bad.get("message") or "") + (bad.text or "")
    if guards_data:
        return "data lost"
    if "AssertionError" in (bad.get("message") or "") or text.lstrip().startswith("assert"):
        return "wrong answer"
    return "traceback"


def run_suite(target: str, guards_data: bool) -> tuple[dict, float]:
    xml = Path(tempfile.mkstemp(suffix=".xml")[1])
    args = target.split(" -k ", 1)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_logging=system-out",
        f"--junitxml={xml}",
        "-m",
        "not browser",
        args[0],
    ] + (["-k", args[1]] if len(args) > 1 else [])
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    counts = dict.fromkeys(COLUMNS, 0)
    for case in ET.parse(xml).getroot().iter("testcase"):
        out = "".join(e.text or "" for e in case.iter("system-out"))
        m = FUZZ.search(out)
        if m:  # one test, hundreds of generated files: count the files
            tried, clear, converted, failed = (int(x) for x in m.groups())
            counts["tried"] += tried
            counts["clear error or right answer"] += clear + converted
            counts["traceback"] += failed
            continue
        kind = _outcome(case, guards_data)
        counts["tried"] += kind != "skipped"
        counts[kind] += 1
    xml.unlink()
    return counts, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip the slow modules")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    a = p.parse_args(argv)
    rows, total = [], dict.fromkeys(COLUMNS, 0)
    for kind, target, guards, slow in SUITES:
        if a.quick and slow:
            continue
        counts, secs = run_suite(target, guards)
        rows.append({"kind": kind, "target": target, **counts, "seconds": round(secs, 1)})
        for c in COLUMNS:
            total[c] += counts[c]
        print(f"{kind}: " + ", ".join(f"{c} {counts[c]}" for c in COLUMNS), flush=True)
    res = {"rows": rows, "total": total, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print("\n| kind of fault | tried | clear error or right answer | traceback | wrong answer | data lost |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in [*rows, {"kind": "**total**", **total}]:
        print(
            f"| {r['kind']} | {r['tried']} | {r['clear error or right answer']} | {r['traceback']} | "
            f"{r['wrong answer']} | {r['data lost']} |"
        )
    bad = total["traceback"] + total["wrong answer"] + total["data lost"]
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
