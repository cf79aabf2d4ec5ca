"""Long fuzzing runs of the targets in tests/fuzz/targets.py; reports inputs tried and escaping exceptions.

Run:
    .venv/bin/python benchmarks/fuzz.py [--seconds 60] [--examples N] [--targets frame,option,...]
                                        [--engine hypothesis|atheris] [--json]

or set MPROXY_FUZZ_SECONDS / MPROXY_FUZZ_EXAMPLES. Per target, until its time (or example count)
is used up:

* ``hypothesis`` (default): the CI strategies (raw bytes, mutated valid inputs, long seeded
  programs) in batches of fresh hypothesis runs without shrinking; a failing input is recorded
  (exception type and where it was raised, first input kept) and the run goes on, so the report
  counts every distinct escaping exception instead of stopping at the first.
* ``atheris`` (optional, ``pip install atheris``; Linux x86-64 wheels): coverage-guided libFuzzer
  over the same byte-level targets, instrumenting ``mproxy``; one child per target, seeded with
  valid inputs. libFuzzer stops at the first crash and writes it to ``--workdir``.

Exit status 1 when anything escaped. The CI-sized run of the same targets is tests/fuzz/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_hypothesis(name: str, seconds: float, examples: int | None, batch: int = 500) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.fuzz.targets import TARGETS
    from tests.fuzz.test_fuzz import inputs

    target = TARGETS[name][0]
    max_size = {"option": 64, "capture": 512, "config": 512, "pipeline": 1500, "alert": 1024}.get(name, 2048)
    tried = 0
    failures: Counter[str] = Counter()
    first: dict[str, str] = {}
    deadline = time.monotonic() + seconds

    def one(data: bytes) -> None:
        nonlocal tried
        tried += 1
        try:
            target(data)
        except Exception as e:  # noqa: BLE001 - counting is the point
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f for f in reversed(tb) if "/mproxy/" in f.filename), tb[-1])
            key = f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {str(e)[:120]}"
            failures[key] += 1
            first.setdefault(key, data.hex())

    while time.monotonic() < deadline and (examples is None or tried < examples):
        n = batch if examples is None else min(batch, examples - tried)
        run = settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                       suppress_health_check=list(HealthCheck))(given(inputs(name, max_size))(one))
        run()
    return {"target": name, "engine": "hypothesis", "inputs": tried, "escaping": sum(failures.values()),
            "distinct": dict(failures), "first_inputs": first}


def run_atheris(name: str, seconds: float, examples: int | None, workdir: Path) -> dict[str, Any]:
    corpus = workdir / f"corpus-{name}"
    corpus.mkdir(parents=True, exist_ok=True)
    from tests.fuzz.targets import TARGETS, Reader

    build = TARGETS[name][1]
    rnd = random.Random(1)
    for i in range(64):  # valid-ish seeds: libFuzzer mutates from there
        (corpus / f"seed{i}").write_bytes(build(Reader(rnd.randbytes(rnd.randint(16, 1500)))))
    args = [sys.executable, __file__, "--atheris-child", name, "--", f"-max_total_time={int(seconds)}",
            "-print_final_stats=1", "-rss_limit_mb=2048", "-timeout=20", f"-artifact_prefix={workdir}/crash-{name}-",
            str(corpus)]
    if examples:
        args.insert(-1, f"-runs={examples}")
    cp = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                        timeout=seconds + 600)
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", cp.stderr)
    crashed = cp.returncode != 0
    tail = cp.stderr.strip().splitlines()[-25:] if crashed else []
    return {"target": name, "engine": "atheris", "inputs": int(m.group(1)) if m else None,
            "escaping": 1 if crashed else 0, "distinct": {"crash": "\n".join(tail)} if crashed else {}}


def atheris_child(name: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["mproxy"]):
        from tests.fuzz.targets import TARGETS
    target = TARGETS[name][0]
    atheris.Setup([sys.argv[0], *argv], target)
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
        rest = sys.argv[3:]
        atheris_child(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    from tests.fuzz.targets import TARGETS, alerts_available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("MPROXY_FUZZ_SECONDS", 60)),
                    help="per target (default 60, or MPROXY_FUZZ_SECONDS)")
    ap.add_argument("--examples", type=int, default=int(os.environ.get("MPROXY_FUZZ_EXAMPLES", 0)) or None,
                    help="stop a target after this many inputs (MPROXY_FUZZ_EXAMPLES)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mproxy-fuzz"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results = []
    for name in a.targets.split(","):
        if name == "alert" and not alerts_available():
            results.append({"target": name, "engine": a.engine, "inputs": 0, "escaping": 0,
                            "distinct": {}, "skipped": "mproxy/core/alerts.py missing"})
            continue
        t0 = time.monotonic()
        if a.engine == "atheris":
            r = run_atheris(name, a.seconds, a.examples, a.workdir)
        else:
            r = run_hypothesis(name, a.seconds, a.examples)
        r["seconds"] = round(time.monotonic() - t0, 1)
        results.append(r)
        if not a.json:
            rate = f"{r['inputs'] / r['seconds']:,.0f}/s" if r["inputs"] and r["seconds"] else "-"
            print(f"{name:9s} {r['engine']:10s} {r['inputs'] or 0:>10,} inputs in {r['seconds']:6.1f} s ({rate}), "
                  f"{r['escaping']} escaping", flush=True)
            for k, v in r["distinct"].items():
                print(f"    {v} x {k}" if isinstance(v, int) else f"    {k}: {v}")
    if a.json:
        print(json.dumps(results, indent=1))
    return 1 if any(r["escaping"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
