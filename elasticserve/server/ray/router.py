"""The Ray Serve request router of the engine deployment: least predicted wait, not round-robin.

Ray Serve runs one router per deployment handle, in the caller's process (here: the ingress).
Replicas report their load through `record_routing_stats` (polled by the Serve controller every
`request_routing_stats_period_s`); the number of requests in flight to each replica comes from
Serve's own queue-length cache, updated on every send and completion, so a burst is spread out
before the next report arrives. The ranking itself is `routing.rank`.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .routing import ReplicaLoad, rank

AVOID_KWARG = "avoid"  # replica ids the request was already tried on, passed by the ingress


class LeastWaitRouter(RequestRouter):
    """Sends each request to the replica with the least predicted wait; ties round-robin."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turn = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """One replica per rank, best first (Serve takes the first with room)."""
        if not candidate_replicas:
            return []
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        loads = [
            ReplicaLoad.from_stats(i, r.routing_stats)
            for i, r in zip(ids, candidate_replicas, strict=True)
        ]
        queued = [self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        avoid = pending_request.kwargs.get(AVOID_KWARG, ()) if pending_request else ()
        self._turn += 1
        order = rank(loads, queued, avoid, self._turn)
        return [[candidate_replicas[i]] for i in order]
