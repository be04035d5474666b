"""Pod-wide counters shared by every worker process: sessions, in-flight bytes, the drain flag, and each
worker's queue figures, so that the session cap, the 455 and /status hold for the pod, not per worker.

What it is for: a small array of 64-bit integers plus a lock. With one process it is a plain local array;
with `--workers N` it is a `multiprocessing` shared-memory array and lock that the supervisor creates and
hands to every worker (fork). Check-and-increment (the greeting's session slot, a MAIL's reservation)
happens under the lock, so two workers can never both take the last slot.

What it must not do: decide replies (policy.py does, called under the lock), I/O, or block for long: the
lock is held only for a few integer operations.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.sharedctypes
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

SESSIONS, INFLIGHT, DRAINING, TERMINATING, GENERATION = range(5)
_HEADER = 8
_PER_WORKER = 4  # queue messages, queue bytes, oldest received_at (microseconds, 0 = none), alive
Q_MESSAGES, Q_BYTES, Q_OLDEST_US, ALIVE = range(_PER_WORKER)

T = TypeVar("T")


class PodState:
    def __init__(self, workers: int = 1, *, shared: bool = False,
                 array: Any = None, lock: Any = None) -> None:
        self.workers = workers
        size = _HEADER + _PER_WORKER * workers
        if array is not None:
            self._array = array
            self._lock = lock
        elif shared:
            ctx = multiprocessing.get_context("fork")
            self._array = ctx.RawArray("q", size)
            self._lock = ctx.Lock()
        else:
            self._array = [0] * size
            self._lock = None

    def handles(self) -> tuple[Any, Any]:
        """What a forked worker needs to attach: PodState(workers, array=..., lock=...)."""
        return self._array, self._lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self._lock is None:
            yield
        else:
            with self._lock:
                yield

    def atomic(self, fn: Callable[[], T]) -> T:
        with self.locked():
            return fn()

    # header fields (reads are single aligned 64-bit loads: fine without the lock)
    def get(self, index: int) -> int:
        return int(self._array[index])

    def add(self, index: int, delta: int) -> int:
        with self.locked():
            self._array[index] += delta
            return int(self._array[index])

    def set(self, index: int, value: int) -> None:
        self._array[index] = value

    @property
    def sessions(self) -> int:
        return self.get(SESSIONS)

    @property
    def inflight(self) -> int:
        return self.get(INFLIGHT)

    @property
    def draining(self) -> bool:
        return self.get(DRAINING) != 0

    # per-worker queue figures, written by each worker, summed by whoever answers /status
    def set_worker(self, worker: int, *, messages: int, nbytes: int, oldest_received_us: int,
                   alive: bool = True) -> None:
        base = _HEADER + _PER_WORKER * worker
        self._array[base + Q_MESSAGES] = messages
        self._array[base + Q_BYTES] = nbytes
        self._array[base + Q_OLDEST_US] = oldest_received_us
        self._array[base + ALIVE] = 1 if alive else 0

    def bump_worker_queue(self, worker: int, *, messages: int, nbytes: int) -> None:
        base = _HEADER + _PER_WORKER * worker
        self._array[base + Q_MESSAGES] += messages
        self._array[base + Q_BYTES] += nbytes

    def workers_ready(self) -> bool:
        """Every worker has published at least once (it publishes only once it listens)."""
        return all(self._array[_HEADER + _PER_WORKER * worker + ALIVE] for worker in range(self.workers))

    def queue_totals(self) -> tuple[int, int, int]:
        """(messages, bytes, oldest received_at in microseconds or 0) over every worker."""
        messages = nbytes = 0
        oldest = 0
        for worker in range(self.workers):
            base = _HEADER + _PER_WORKER * worker
            messages += int(self._array[base + Q_MESSAGES])
            nbytes += int(self._array[base + Q_BYTES])
            worker_oldest = int(self._array[base + Q_OLDEST_US])
            if worker_oldest and (oldest == 0 or worker_oldest < oldest):
                oldest = worker_oldest
        return messages, nbytes, oldest
