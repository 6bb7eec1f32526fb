"""Each API key's share of the engines: requests generating at once, per key."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from service.errors import ApiError


class TenantStreams:
    """A key may have `limit` requests generating at once (NPC_TENANT_MAX_STREAMS); one more is a 429.

    Decode batches are shared by every tenant, and on a busy engine a step's time grows with its batch:
    without a cap one key's flood of streams makes every other key's first token wait. Admin keys (and a
    server without keys) are not capped. Counted in this API process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.running: Counter[str] = Counter()

    def take(self, who) -> Callable[[], None]:
        """Count one request of `who`; the returned callable releases it (once, however often called)."""
        if who.admin:
            return lambda: None
        if self.running[who.tenant] >= self.limit:
            raise ApiError(429, f"this API key already has {self.limit} requests generating "
                                "(NPC_TENANT_MAX_STREAMS); retry when one has finished",
                           code="too_many_streams", headers={"Retry-After": "1"})
        self.running[who.tenant] += 1
        done = []

        def release() -> None:
            if not done:
                done.append(True)
                self.running[who.tenant] -= 1
                if self.running[who.tenant] <= 0:
                    del self.running[who.tenant]

        return release


async def shared(streams: TenantStreams, who, stream: bool, start):
    """Run `start()` within `who`'s share: a plain answer is returned with the count released; a
    stream's (events, release) comes back with a release that also frees the count."""
    mine = streams.take(who)
    try:
        out = await start()
    except BaseException:
        mine()
        raise
    if not stream:
        mine()
        return out
    events, release = out

    async def done() -> None:
        mine()
        await release()

    return events, done
