"""Benchmark: the operator reconciling ChatDeployments against kmock's emulator.

Runs the real operator (``python -m chatfleet.operator run``, a subprocess) against
the extended kmock Kubernetes emulator of the tests (in this process, over HTTP on
localhost) and prints:

- latency from creating a ChatDeployment to its RayService existing, one at a
  time (p50, p99; target p50 <= 1 s);
- wall time until 100 ChatDeployments created at once all have a RayService and
  a reconciled status (target <= 30 s);
- the operator process's RSS (peak and at the end).

Figures, never assertions. Usage: ``python bench/operator.py [--sequential N] [--burst N]``.
"""

from __future__ import annotations

import sys

# This file shares its name with the stdlib module `operator`: run as a script, its
# folder comes first on sys.path and would shadow it. Take the folder off the path.
if __name__ == "__main__" and sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

import aiohttp  # noqa: E402
import kmock  # noqa: E402
from kmock_emulator import StampingEmulator  # noqa: E402

CD = "chatfleet.dev/v1alpha1/chatdeployments"
RS = "ray.io/v1/rayservices"
NS = "bench"


def declare(emulator: StampingEmulator) -> None:
    emulator.resources.load_bundled()
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    emulator.resources[CD] = kmock.ResourceInfo(
        kind="ChatDeployment", singular="chatdeployment", namespaced=True,
        subresources={"status"}, verbs=verbs,
    )  # fmt: skip
    emulator.resources[RS] = kmock.ResourceInfo(
        kind="RayService", singular="rayservice", namespaced=True,
        subresources={"status"}, verbs=verbs,
    )  # fmt: skip


def find(emulator: StampingEmulator, resource: str, name: str) -> dict[str, Any] | None:
    res = kmock.resource(resource)
    for (r, ns, n), obj in emulator.objects.items():
        if r == res and ns == NS and n == name and not obj.deleted:
            return obj.raw  # type: ignore[no-any-return]
    return None


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def start_operator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m chatfleet.operator run`` with its log in ``log`` (the child keeps the fd)."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "chatfleet.operator", "run", "--liveness", ""],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip


def body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "chatfleet.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"serving": {"models": [{"name": "fake", "engine": "fake"}]}},
    }


async def wait_for(check: Any, within: float = 60.0, step: float = 0.005) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > within:
            raise TimeoutError("timed out")
        await asyncio.sleep(step)
    return time.perf_counter()


async def run(sequential: int, burst: int) -> None:
    async with StampingEmulator() as emulator, kmock.Server(emulator):
        declare(emulator)
        workdir = Path(tempfile.mkdtemp(prefix="chatfleet-bench-"))
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: k\n"
            f"clusters: [{{name: k, cluster: {{server: '{str(emulator.url).rstrip('/')}'}}}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: k, context: {cluster: k, user: u}}]\n"
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "CHATFLEET_OPERATOR_KUBECONFIG": str(kubeconfig),
            "CHATFLEET_OPERATOR_METRICS_PORT": "0",
            "CHATFLEET_OPERATOR_METRICS_HOST": "127.0.0.1",
            "CHATFLEET_OPERATOR_POST_EVENTS": "false",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = start_operator(env, workdir / "operator.log")
        peak = 0
        try:
            async with aiohttp.ClientSession(base_url=str(emulator.url)) as http:
                url = f"/apis/chatfleet.dev/v1alpha1/namespaces/{NS}/chatdeployments"

                async def create(name: str) -> float:
                    async with http.post(url, json=body(name)) as r:
                        assert r.status < 300, await r.text()
                    return time.perf_counter()

                # Warm-up: the operator's start-up and first watch.
                await create("warmup")
                await wait_for(lambda: find(emulator, RS, "warmup"), within=60)

                latencies = []
                for i in range(sequential):
                    name = f"seq-{i}"
                    started = await create(name)
                    done = await wait_for(lambda n=name: find(emulator, RS, n))  # type: ignore[misc]
                    latencies.append(done - started)
                    peak = max(peak, rss_kib(proc.pid)[1])
                latencies.sort()
                p50 = statistics.median(latencies)
                p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
                print(f"create -> RayService, sequential n={sequential}: "
                      f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                      f"max {latencies[-1] * 1000:.0f} ms (target p50 <= 1000 ms)")  # fmt: skip

                names = [f"burst-{i}" for i in range(burst)]
                started = time.perf_counter()
                await asyncio.gather(*(create(n) for n in names))
                created = time.perf_counter()

                def all_reconciled() -> bool:
                    for n in names:
                        cd = find(emulator, CD, n)
                        if not find(emulator, RS, n) or not cd:
                            return False
                        if (cd.get("status") or {}).get("observedGeneration") != 1:
                            return False
                    return True

                done = await wait_for(all_reconciled, within=300, step=0.05)
                current, hwm = rss_kib(proc.pid)
                peak = max(peak, hwm)
                print(f"{burst} ChatDeployments created at once: all reconciled (RayService +"
                      f" status) in {done - started:.2f} s (creation took"
                      f" {created - started:.2f} s; target <= 30 s)")  # fmt: skip
                print(f"operator RSS: {current / 1024:.0f} MiB now, {peak / 1024:.0f} MiB peak"
                      f" ({len(names) + sequential + 1} ChatDeployments)")  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"operator exit code {proc.returncode}; log: {workdir / 'operator.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=30, help="one-at-a-time creations")
    parser.add_argument("--burst", type=int, default=100, help="creations at once")
    args = parser.parse_args()
    asyncio.run(run(args.sequential, args.burst))


if __name__ == "__main__":
    main()
