"""Peak RSS of ``mproxy replay`` over 100k and 1M short-lived MPTCP connections: must be flat.

Run: .venv/bin/python benchmarks/connections.py [--counts 100000,1000000] [--workdir /tmp/mproxy-conns] [--keep]

Why: a gateway sees connections come and go forever; anything kept per connection after it ends
(records, tokens, emitters, subflow entries past their linger) shows up as RSS growing with the
count. The captures come from tests/core/manyconns.py (five packets per connection built with our
encoder, 200 new connections per second of capture time, ~6000 closed ones lingering at any time);
each replay runs in a fresh interpreter (``ru_maxrss`` of that child), output to /dev/null.
The CI test (tests/core/test_adversarial.py) compares 10k with 50k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def replay_rss(path: Path) -> tuple[int, float]:
    code = ("import resource, time; from mproxy.cli import main; t = time.monotonic(); "
            f"rc = main(['replay', {str(path)!r}, '--out', '/dev/null', '-q']); assert rc == 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic() - t)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    rss, secs = cp.stdout.split()
    return int(rss), float(secs)


def main() -> int:
    from tests.core.manyconns import write_capture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="100000,1000000")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mproxy-conns"))
    ap.add_argument("--keep", action="store_true", help="keep the generated captures")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in a.counts.split(",")):
        cap = a.workdir / f"conns-{n}.pcap"
        t0 = time.monotonic()
        packets = write_capture(cap, n)
        gen = time.monotonic() - t0
        size = cap.stat().st_size
        rss, secs = replay_rss(cap)
        if not a.keep:
            cap.unlink()
        rows.append({"connections": n, "packets": packets, "mb": round(size / 1e6, 1), "generate_s": round(gen, 1),
                     "replay_s": round(secs, 1), "pkt_per_s": round(packets / secs), "peak_rss_mib": round(rss / 1024, 1)})
        if not a.json:
            r = rows[-1]
            print(f"{n:>9,} connections, {packets:,} packets ({r['mb']} MB, generated in {r['generate_s']} s): "
                  f"replay {r['replay_s']} s ({r['pkt_per_s']:,} pkt/s), peak RSS {r['peak_rss_mib']} MiB", flush=True)
    if a.json:
        print(json.dumps(rows))
    elif len(rows) > 1:
        d = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
        print(f"peak RSS {rows[-1]['connections'] // rows[0]['connections']}x the connections: {d:+.1f} MiB "
              f"({100 * d / rows[0]['peak_rss_mib']:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
