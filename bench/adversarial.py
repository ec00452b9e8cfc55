"""The webhook under attack, on loopback: worst-case admissions and the event loop's worst stall
beside the normal case, and RSS with 2,000 idle TLS connections before/after.

Each attack runs while a prober sends normal AdmissionReviews back to back; "worst normal" is
the slowest of those answers, i.e. how long the one event loop was unavailable to every other
pod. The baseline is the same prober with no attack, measured in the same run. With
`--before DIR` the same attacks also run against an older checkout (a `git archive` of it, with
kvmesh/webhook, kvmesh/controller and kvmesh/certs symlinked to its top-level folders), so
one run prints before and after side by side.

    .venv/bin/python bench/adversarial.py [--before /tmp/kvmesh-before] [--quick] [--client-nice 19]

The client (attacks and prober) shares the machine with the webhook: on 2 cores its own CPU
(building and encrypting a 2.9 MB body) shows up as loop lag of the webhook. --client-nice 19
keeps the webhook at its deployed priority ahead of the client, as when the client is elsewhere.

Goal (issue #12): no attack stalls the loop beyond a few ms above the baseline; RSS stays under
the manifest's 256 MiB limit; no 500, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import attacks as A  # noqa: E402
from support import review_for  # noqa: E402

MANIFEST_LIMIT_MIB = 256


def _ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms"


class _Shown(dict):
    """Results, each printed (stderr) as it comes: a long run shows its progress."""

    def __setitem__(self, k: str, v: str) -> None:
        print(f"  {k}: {v}", file=sys.stderr, flush=True)
        super().__setitem__(k, v)


def measure(t: A.Target, quick: bool) -> dict[str, str]:
    out: dict[str, str] = _Shown()

    def late() -> dict[float, int]:
        return t.lag_buckets() if t.metrics_port else {}

    def normal(p: A.Prober) -> str:
        lat = sorted(p.latencies) or [0.0]
        return (f"normal reviews: median {_ms(statistics.median(lat))}, "
                f"p99 {_ms(lat[int(len(lat) * 0.99)])}, worst {_ms(lat[-1])}")

    def loop(l0: dict[float, int]) -> str:
        """Ticks of the loop's 50 ms timer since l0: how many ran > 10 ms late, and the worst
        one's histogram bucket (the smallest bound that holds every tick of the phase)."""
        l1 = late()
        if not l1:
            return ""
        d = {le: n - l0.get(le, 0) for le, n in l1.items()}
        ticks = d[float("inf")]
        worst = min((le for le, n in d.items() if n == ticks), default=float("inf"))
        bound = "> 1 s" if worst == float("inf") else f"<= {worst * 1000:g} ms"
        return f"; loop >10 ms late {ticks - d.get(0.01, 0)} of {ticks} ticks, worst {bound}"

    def under(name: str, fn, repeat: int = 3) -> None:
        l0 = late()
        with A.Prober(t, timeout=60) as p:
            t0 = time.perf_counter()
            for _ in range(repeat):
                what = fn()
            took = (time.perf_counter() - t0) / repeat
            time.sleep(0.3)  # let a stall that outlives the answer show up in the prober
        fails = f", {len(p.failures)} probe failures" if p.failures else ""
        out[name] = f"{what}; {_ms(took)} each (x{repeat}); {normal(p)}{loop(l0)}{fails}"

    # Baseline: normal admissions only, as long as the attacks below take.
    l0 = late()
    with A.Prober(t) as p:
        time.sleep(2 if quick else 5)
    out["normal (baseline)"] = f"{len(p.latencies)} reviews; {normal(p)}{loop(l0)}"

    def review(pod: dict) -> str:
        code, body, s = t.review(pod, timeout=60)
        resp = json.loads(body).get("response", {}) if code == 200 else {}
        verdict = "allowed" if resp.get("allowed") else "denied" if resp else "no answer"
        return f"HTTP {code} {verdict} in {_ms(s)}"

    for ranks in ((1000,) if quick else (1000, 10_000)):
        under(f"TP {ranks:,} pod", lambda: review(A.parallel_pod(ranks)))
    script = 2_900_000
    under("2.9 MB sh -c script", lambda: review(A.script_pod(script)))
    under("50,000 env entries", lambda: review(A.env_pod(50_000)))
    bomb = A.gzip_bomb(256 if quick else 2048)

    def send_bomb() -> str:
        code, _, s = t.post("/mutate", bomb, {"Content-Type": "application/json",
                                               "Content-Encoding": "gzip"}, timeout=60)
        return f"{len(bomb) // 1024:,} KiB gzip: HTTP {code} in {_ms(s)}"
    under(f"gzip bomb ({256 if quick else 2048} MiB unpacked)", send_bomb)
    code, _, _ = t.post("/mutate", A.deep_kind(1000))
    out["kind nested 1,000 deep"] = f"HTTP {code}"
    code, _, _ = t.post("/mutate", A.deep_object(900))
    out["env value nested 900 deep"] = f"HTTP {code}"
    before = A.tracebacks(t.log())
    for _ in range(5):
        A.aborted_upload(t)
    time.sleep(0.5)
    out["5 aborted uploads"] = f"{A.tracebacks(t.log()) - before} tracebacks logged"
    inf = json.loads(t.review(A.annotated_pod("kvmesh.dev/cpu-cache-gb", "inf"))[1])
    out['cpu-cache-gb: "inf"'] = "allowed" if inf["response"]["allowed"] else "denied"
    out["TLS 1.2 CBC-only client"] = "accepted" if A.tls_accepts(
        t, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384", ssl.TLSVersion.TLSv1_2) \
        else "refused"
    c = t.connect()
    c.request("GET", "/metrics")
    out["GET /metrics on the admission port"] = f"HTTP {c.getresponse().status}"
    c.close()

    # Idle connections: RSS before, with, and after they are gone.
    n = 500 if quick else 2000
    rss0 = t.rss_mib()
    l0 = late()
    with A.Prober(t) as p:
        socks = A.open_idle(t, n)
        time.sleep(1)
        opened, rss1 = A.still_open(socks), t.rss_mib()
    A.close_all(socks)
    time.sleep(2)
    out[f"{n:,} idle TLS connections"] = (
        f"{opened:,} held open; RSS {rss0:.0f} -> {rss1:.0f} -> {t.rss_mib():.0f} MiB "
        f"(before/with/after); worst normal while open {_ms(p.worst)}{loop(l0)}")
    out["RSS of the webhook and its worker"] = f"{t.group_rss_mib():.0f} MiB"
    l0 = late()
    socks = A.slowloris(t, 300)
    time.sleep(1)
    held1, rss = A.still_open(socks), t.rss_mib()
    time.sleep(11)  # past the 10 s header timeout
    out["300 slowloris connections"] = f"{held1:,} held open after 1 s, " \
        f"{A.still_open(socks):,} after 12 s; RSS {rss:.0f} MiB{loop(l0)}"
    A.close_all(socks)
    if t.metrics_port:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics") as r:
            text = r.read().decode()
        lag = next(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("kvmesh_webhook_event_loop_lag_max_seconds "))
        out["worst event-loop lag (its own metric)"] = _ms(lag)
    out["peak RSS (whole run)"] = f"{t.peak_mib():.0f} MiB (manifest limit " \
                                  f"{MANIFEST_LIMIT_MIB} MiB)"
    out["tracebacks in the log (whole run)"] = str(A.tracebacks(t.log()))
    out["exit after SIGTERM"] = f"{t.stop():.1f} s"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="an older checkout to compare with")
    ap.add_argument("--quick", action="store_true", help="smaller attacks (a minute)")
    ap.add_argument("--client-nice", type=int, default=0, metavar="N",
                    help="run the attacking and probing client at this nice value, the webhook "
                         "at 0 and its worker at 10 as deployed (root): on a real cluster the "
                         "attacker and the API server are not on the webhook's cores")
    args = ap.parse_args()
    if args.client_nice:
        os.nice(args.client_nice)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # An older tree gets its own ops port when its CLI has one.
        runs = [("before", args.before, "metrics-host" in (args.before / "kvmesh/cli.py")
                 .read_text())] if args.before else []
        for name, root, separate in runs + [("this tree", REPO, True)]:
            t = A.start_webhook(Path(tmp) / name.replace(" ", "-"), root=root,
                                separate_metrics=separate)
            if args.client_nice:  # the webhook inherited the client's nice value
                os.setpriority(os.PRIO_PROCESS, t.proc.pid, 0)
                for pid in t.group_pids():
                    if pid != t.proc.pid:
                        os.setpriority(os.PRIO_PROCESS, pid, 10)
            try:
                results[name] = measure(t, args.quick)
            finally:
                if t.proc.poll() is None:  # an attack that raised: never leave it running
                    t.stop()
    cols = list(results)
    width = max(len(k) for k in results[cols[-1]])
    for k in results[cols[-1]]:
        print(f"{k:<{width}}")
        for c in cols:
            print(f"    {c:>9}: {results[c].get(k, '-')}")


if __name__ == "__main__":
    main()
