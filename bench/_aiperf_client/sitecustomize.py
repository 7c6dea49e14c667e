"""aiperf's fixed-concurrency mode without its busy-wait, for bench/aiperf.py.

Loaded into aiperf's own processes only (bench/aiperf.py puts this folder on their
PYTHONPATH unless ``--stock-client``). aiperf 0.13's timing manager, with every
concurrency slot taken, loops on ``try_issue_credit`` -> None -> ``yield_to_event_loop``
(``aiperf/timing/strategies/request_rate.py``, the "no slot available, retry later"
branch) until a slot frees: py-spy shows it there, and it burns 0.88 of the 2 cores
at 256 streams, which the servers under test then lack (both servers alike, but a
server of several processes loses more to it than a single process does).

Here, a try that finds no slot waits for the next slot release (at most 5 ms, so stop
conditions are still checked) before the strategy tries again. A slot is taken the
moment it is released, as before; what the client sends and how it times requests
(TTFT starts when a request is sent) are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def _install() -> None:
    try:
        from aiperf.credit.issuer import CreditIssuer
        from aiperf.timing.concurrency import ConcurrencyManager
    except ImportError:  # not aiperf, or another release: leave it alone
        return
    released: dict[int, asyncio.Event] = {}  # one per event loop (by id)

    def wake_waiters() -> None:
        for event in released.values():
            event.set()

    def releasing(original: Any) -> Any:
        def release(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            finally:
                wake_waiters()

        return release

    for name in ("release_session_slot", "release_prefill_slot", "release_stuck_slots"):
        setattr(ConcurrencyManager, name, releasing(getattr(ConcurrencyManager, name)))

    try_issue = CreditIssuer.try_issue_credit

    async def try_issue_credit(self: Any, turn: Any) -> Any:
        result = await try_issue(self, turn)
        if result is None:  # no slot: sleep until one is released instead of spinning
            event = released.setdefault(id(asyncio.get_running_loop()), asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), 0.005)
            event.clear()
        return result

    CreditIssuer.try_issue_credit = try_issue_credit  # type: ignore[method-assign]


_install()
