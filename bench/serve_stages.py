"""Where a streamed request's time to first token goes inside Ray Serve's handle call.

Run from the repository root::

    .venv/bin/python bench/serve_stages.py                 # 32 streams, 25 s
    .venv/bin/python bench/serve_stages.py --streams 8 --duration 15

Starts ``chatfleet serve --no-auth`` (the path users run, default settings, one fake
model paced at 50 tokens/s) with a probe on the Python path (bench/_serve_stages: it
wraps Serve's router, its gRPC servicer and the token relay in the Ray workers, see its
docstring), loads it with aiperf at fixed concurrency as bench/aiperf.py does, and
prints each stage's p50/p90 per request, for requests the engine replica took while at
most 3 others ran ("quiet") and while 16 or more did ("loaded"), with the load average.
The probe costs a few microseconds a stage; aiperf shares the cores with the server.
Prints figures; asserts nothing.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib's `operator` module: keep bench/ off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import collections
import importlib.util
import json
import tempfile
from pathlib import Path

HERE = Path(_HERE)

#: (from, to, what it is); the stage letters are bench/_serve_stages/sitecustomize.py's.
STAGES = [
    ("A0", "A3", "ingress: router assigns -> opens the gRPC call"),
    ("A3", "R0", "gRPC call -> engine replica's servicer starts"),
    ("R0", "R2", "engine replica: unpickle, accept"),
    ("R2", "R3", "accept -> user generator starts"),
    ("R3", "E1", "engine: start -> first batch on the relay link"),
    ("E1", "Q1", "relay: engine -> ingress's stream queue"),
    ("Q1", "B1", "ingress reads it (after admission)"),
    ("R2", "A4", "accept -> the router has the answer (gRPC back)"),
    ("H", "A0", "ingress: HTTP request -> the handle call (app, validation, admission)"),
    ("A0", "O", "ingress: router assigns -> request sent ahead on the link"),
    ("O", "C", "link: ingress -> engine replica starts the copy"),
    ("C", "S", "engine: its generation task runs"),
    ("S", "E1", "engine: start from the copy -> first batch on the relay link"),
    ("A0", "R3", "total: assign -> engine starts (handle call)"),
    ("A0", "S", "total: assign -> engine starts (copy sent ahead)"),
    ("A0", "B1", "total: assign -> ingress has the first batch"),
    ("B1", "X1", "ingress: first batch -> the SSE response is called"),
    ("X1", "X0", "ingress: SSE response called -> its headers go to uvicorn"),
    ("X0", "W", "ingress: headers -> first SSE event goes to uvicorn"),
    ("B1", "W", "ingress: first batch -> its SSE event goes to uvicorn"),
    ("H", "W0", "ingress: HTTP request -> first body bytes (the role chunk)"),
    ("H", "B1", "total: HTTP request in the ingress -> it has the first batch"),
    ("H", "W", "total: HTTP request in the ingress -> first content event out"),
]


def load_aiperf_bench() -> object:
    spec = importlib.util.spec_from_file_location("_aiperf_bench", HERE / "aiperf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def read_trace(folder: Path) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Stage times per request, and the requests running on the engine at R1."""
    times: dict[str, dict[str, float]] = collections.defaultdict(dict)
    ongoing: dict[str, int] = {}
    keys: dict[str, str] = {}
    for path in folder.glob("*.tsv"):
        for line in path.read_text().splitlines():
            stage, rid, at, extra = line.split("\t")
            times[rid].setdefault(stage, float(at))
            if stage == "R1":
                ongoing[rid] = int(extra.split("=")[1])
            elif stage == "K":
                keys[extra] = rid
    for key, rid in keys.items():  # stamped by relay key
        for stage in ("E1", "O", "C", "S"):
            if stage in times.get(key, {}):
                times[rid][stage] = times[key][stage]
    return times, ongoing


def report(folder: Path) -> None:
    times, ongoing = read_trace(folder)
    for label, fits in (
        ("quiet (<= 3 others)", lambda n: n <= 3),
        ("loaded (>= 16)", lambda n: n >= 16),
    ):
        rids = [r for r, n in ongoing.items() if fits(n)]
        print(f"\n{label}: {len(rids)} requests  (ms: p50 / p90)")
        for start, end, what in STAGES:
            spans = [
                (times[r][end] - times[r][start]) * 1000
                for r in rids
                if start in times[r] and end in times[r]
            ]
            if spans:
                print(
                    f"  {start}->{end}  {quantile(spans, 0.5):7.2f} / {quantile(spans, 0.9):7.2f}"
                    f"   {what}"
                )


def client_view(folder: Path, export: Path) -> None:
    """aiperf's time to first token split where the ingress's app sees the request: the
    way in (client, HAProxy, the replica's HTTP server and Serve's request handling up to
    the app), the app (to its first content event), and the way back out."""
    times, _ = read_trace(folder)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for line in export.read_text().splitlines():
        record = json.loads(line)
        meta, metrics = record["metadata"], record.get("metrics") or {}
        stamps = times.get(meta.get("x_request_id", ""), {})
        ttft = (metrics.get("time_to_first_token") or {}).get("value")
        if meta.get("phase_kind") != "profiling" or ttft is None or "WX" not in stamps:
            continue
        start = meta["request_start_ns"] / 1e9
        parts["in"].append((stamps["HX"] - start) * 1000)
        parts["app"].append((stamps["WX"] - stamps["HX"]) * 1000)
        parts["out"].append(start * 1000 + ttft - stamps["WX"] * 1000)
        parts["ttft"].append(ttft)
    count = len(parts["ttft"])
    print(f"\nthe client's time to first token, split ({count} requests; ms p50 / p90)")
    for key, what in (
        ("in", "client -> HAProxy -> replica -> the app gets the request"),
        ("app", "the app: request -> first content event (H -> W)"),
        ("out", "first content event -> HAProxy -> the client has it"),
        ("ttft", "aiperf's time to first token"),
    ):
        if parts[key]:
            print(
                f"  {key:>4}  {quantile(parts[key], 0.5):7.2f} / {quantile(parts[key], 0.9):7.2f}"
                f"   {what}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, default=32, help="aiperf's concurrency.")
    p.add_argument("--duration", type=float, default=25.0, help="Seconds measured.")
    p.add_argument("--tps", type=float, default=50.0, help="Tokens/s per stream (fake model).")
    p.add_argument("--tokens", type=int, default=256, help="Tokens per reply.")
    p.add_argument("--trace", default=None, help="Keep the trace here (default: a temp dir).")
    p.add_argument("--client-nice", type=int, default=0, help="aiperf's niceness.")
    p.add_argument("--chatfleet-settings", default="{}", help="As bench/aiperf.py's.")
    p.add_argument(
        "--stock-client", action="store_true", help="aiperf as released (see bench/aiperf.py)."
    )
    args = p.parse_args(argv)
    bench = load_aiperf_bench()
    exe = bench.aiperf_bin()  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="chatfleet-stages-") as tmp:
        work = Path(tmp)
        trace = Path(args.trace) if args.trace else work / "trace"
        probe = str(HERE / "_serve_stages")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [*filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), probe]
        )
        os.environ["CHATFLEET_STAGE_TRACE_DIR"] = str(trace)
        with bench.tiktoken_cache() as tk:  # type: ignore[attr-defined]
            env = {**os.environ, "TIKTOKEN_CACHE_DIR": tk, "HF_HUB_OFFLINE": "1"}
            env.pop("CHATFLEET_STAGE_TRACE_DIR")
            server = bench.chatfleet(args, work)  # type: ignore[attr-defined]
            try:
                load_before = os.getloadavg()[0]
                r = bench.profile(exe, server, args.streams, args, work / "aiperf", env)  # type: ignore[attr-defined]
                load_after = os.getloadavg()[0]
            finally:
                server.stop()
        print(
            f"chatfleet at {args.streams} streams: TTFT p50 {r['ttft_p50_ms']:.1f} ms,"
            f" p99 {r['ttft_p99_ms']:.1f} ms, {r['tok_s']:.0f} tok/s, errors {r['errors']};"
            f" load average {load_before:.1f} -> {load_after:.1f}"
        )
        report(trace)
        client_view(trace, work / "aiperf" / "profile_export.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
