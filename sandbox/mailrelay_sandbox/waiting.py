"""Polling until something holds, for the sandbox, the tests and the benchmark.

What it is for: the one `wait_until` (blocking) and the one `eventually` (asyncio), with one shape:
`check`, `within` seconds, polled `every` seconds, and `what` names the condition in the TimeoutError
raised when it never held. Timeouts are generous deadlines for a loaded machine, never timing assertions.

What it must not do: sleep a fixed time and assume something happened (or did not): it only returns once
`check` held, or raises.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


def wait_until(check: Callable[[], bool], *, within: float = 30.0, every: float = 0.05,
               what: str = "condition", between: Callable[[], None] | None = None,
               between_every: float = 2.0) -> None:
    """Poll `check` until true, else TimeoutError naming `what`; `between` (a forced queue run, say)
    runs every `between_every` seconds meanwhile."""
    deadline = time.monotonic() + within
    next_between = time.monotonic() + between_every
    while not check():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        if between is not None and now >= next_between:
            between()
            next_between = now + between_every
        time.sleep(every)


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 60.0,
                     every: float = 0.2, what: str = "condition") -> None:
    """Poll `check` (plain or async) until true, else TimeoutError naming `what`."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(every)
