"""A steady open-loop load through a gateway that counts every failed request by its
reason: the fault and churn tests run one while they break things."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import urllib.error
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

# request i, sent; answers what it was ("gRPC", "REST", ...) for the served counter
Request = Callable[[int], Awaitable[str]]


@dataclass
class Load:
    request: Request
    rate: float
    served: Counter[str] = field(default_factory=Counter)  # by what the request answered
    failures: Counter[str] = field(default_factory=Counter)  # by reason
    scheduled: int = 0  # what the pacing should have sent, once the load ended
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return self.served.total() + self.failures.total()

    async def send(self, i: int) -> None:
        try:
            kind = await self.request(i)
        except grpc.aio.AioRpcError as e:
            self.failures[f"{e.code().name}: {e.details()}"] += 1
        except urllib.error.HTTPError as e:
            self.failures[f"HTTP {e.code}: {e.read().decode(errors='replace')}"] += 1
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
            self.failures[f"REST {type(e).__name__}: {e}"] += 1
        else:
            self.served[kind] += 1

    def check(self, what: str) -> None:
        print(
            f"{what}: served {self.served.total()} {dict(self.served)} of {self.scheduled} "
            f"scheduled in {self.seconds:.1f}s, failures {dict(self.failures)}"
        )
        assert not self.failures, f"{what}: failed requests {dict(self.failures)}"
        # the load really ran, at about its rate
        assert self.served.total() >= 0.8 * self.scheduled, (what, self.served, self.scheduled)


@asynccontextmanager
async def paced_load(request: Request, rate: float = 200, workers: int = 8) -> AsyncIterator[Load]:
    """Request i goes out at i / rate s, by whichever of ``workers`` is free: a slow answer
    delays no other request while a worker is free."""
    load, stop, tickets = Load(request, rate), asyncio.Event(), itertools.count()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def worker() -> None:
        while not stop.is_set():
            i = next(tickets)
            await asyncio.sleep(start + i / rate - loop.time())  # late: at once
            if not stop.is_set():
                await load.send(i)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        yield load
    finally:
        stop.set()
        load.seconds = loop.time() - start
        load.scheduled = int(load.seconds * rate)
        await asyncio.gather(*tasks)
