"""One look at a MailRelay's relays: its pods (from the read cache, else the API) and the `/status` of
each running relay, asked concurrently, as `drain.PodState`s.

What it must not do: write anything, or decide; the scaling loop and the finalizer decide from what it
returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from mailrelay_operator import drain, kube, kubetypes, manifests, metrics, owned, relayclient, runtime


@dataclass(frozen=True)
class Observation:
    pods: Mapping[str, kubetypes.Pod]  # by name
    states: tuple[drain.PodState, ...]

    def endpoints(self, names: Iterable[str], token: str | None) -> list[relayclient.Endpoint]:
        """The admin endpoints of the pods named in `names` that were seen and have an IP."""
        found = (self.pods.get(name) for name in names)
        eps = (relayclient.endpoint(pod, token) for pod in found if pod is not None)
        return [ep for ep in eps if ep is not None]


async def observe(rt: runtime.Runtime, namespace: str, name: str, memory: runtime.Memory) -> Observation:
    """The pods of MailRelay `name` and their relays' answers; a failed scrape counts in
    `scrape_errors_total` and leaves that relay's figures unknown (None)."""
    pods = cast(list[kubetypes.Pod],
                await rt.read.list_(kube.PODS, namespace, manifests.selector_labels(name)))
    token = await owned.token(rt, namespace, name, memory)
    endpoints = {
        p["metadata"]["name"]: (
            relayclient.endpoint(p, token)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
            else None
        )
        for p in pods
    }
    statuses = await rt.relays.status_many(endpoints)
    failures = sum(1 for pod, ep in endpoints.items() if ep is not None and statuses.get(pod) is None)
    if failures:
        metrics.SCRAPE_ERRORS.labels(namespace, name).inc(failures)
    return Observation(
        pods={p["metadata"]["name"]: p for p in pods},
        states=tuple(drain.pod_state(p, statuses.get(p["metadata"]["name"])) for p in pods),
    )
