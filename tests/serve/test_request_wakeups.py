"""Async wake-ups of request streams, batched per engine step (serve/request.py)."""

from __future__ import annotations

import asyncio
import random
import threading

from sentinel_kernels.serve import SamplingParams
from sentinel_kernels.serve.request import Request, RequestStream, batched_wakeups


def _request(i: int, max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(f"r{i}", [1, 2, 3], params, None, frozenset(), lambda: None)


def _run_streams(n: int, steps: int, batched: bool) -> tuple[list[list[int]], int, list[list[int]]]:
    """``n`` async streams fed ``steps`` tokens each from a producer thread, one "step" at a
    time (inside ``batched_wakeups`` when ``batched``). Returns what each stream received,
    how many ``call_soon_threadsafe`` calls reached the loop, and what was sent."""
    reqs = [_request(i, steps) for i in range(n)]
    rng = random.Random(n * 1000 + steps)
    sent = [[rng.randrange(50_000) for _ in range(steps)] for _ in range(n)]
    calls = 0

    async def main() -> list[list[int]]:
        nonlocal calls
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counted(*args: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            return plain(*args, **kw)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        async def consume(req: Request) -> list[int]:
            got: list[int] = []
            async for batch in RequestStream(req).batches():
                got += batch
            return got

        tasks = [asyncio.create_task(consume(r)) for r in reqs]
        await asyncio.sleep(0.01)  # every consumer is waiting on its future

        def produce() -> None:
            for s in range(steps):
                ctx = batched_wakeups() if batched else _nothing()
                with ctx:
                    for i, req in enumerate(reqs):
                        req.emit(sent[i][s], float(s))

        th = threading.Thread(target=produce)
        th.start()
        out = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        th.join(timeout=30)
        return list(out)

    received = asyncio.run(main())
    return received, calls, sent


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_batched_wakeups_deliver_every_token_in_order() -> None:
    received, calls, sent = _run_streams(n=7, steps=13, batched=True)
    assert received == sent
    # at most one wake-up per step (fewer when a consumer had not re-armed yet)
    assert 1 <= calls <= 13


def test_unbatched_wakeups_still_deliver() -> None:
    received, calls, sent = _run_streams(n=7, steps=13, batched=False)
    assert received == sent
    assert calls >= 7  # one per waiting stream at least for the first token


def test_batched_wakeups_nest_and_survive_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    req = _request(0, 4)
    req._async_waiters.append((loop, fut))
    loop.close()
    with batched_wakeups(), batched_wakeups():  # the inner block joins the outer one
        req.emit(5, 0.0)  # its waiter's loop is closed: dropped, no error
    assert req.token_ids == [5]
