"""The coarse timeouts behind every exchange's total timeout: each fires once, never before its
delay and about a tick after it, unless disarmed first; on uvloop, the loop the gateway runs."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.wheel import TICK_SECONDS, TimeoutWheel

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return uvloop.run(main())  # type: ignore[arg-type]


# uvloop's clock counts whole milliseconds
CLOCK_RESOLUTION = 0.001


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.05), st.booleans()),
        min_size=1,
        max_size=40,
    )
)
@pytest.mark.slow
def test_every_armed_timeout_fires_once_not_before_its_delay_unless_disarmed(
    plan: list[tuple[float, bool]],
) -> None:
    async def main() -> tuple[dict[int, list[float]], dict[int, float]]:
        loop = asyncio.get_running_loop()
        wheel = TimeoutWheel()
        fired: dict[int, list[float]] = {}
        armed_at: dict[int, float] = {}
        buckets = []
        for key, (delay, _) in enumerate(plan):
            armed_at[key] = loop.time()
            callback = lambda key=key: fired.setdefault(key, []).append(loop.time())  # noqa: E731
            buckets.append(wheel.arm(key, delay, callback))
        for key, (_, disarm) in enumerate(plan):
            if disarm:
                wheel.disarm(key, buckets[key])
        await asyncio.sleep(max(delay for delay, _ in plan) + 0.1)
        wheel.close()
        return fired, armed_at

    fired, armed_at = run(main)
    assert set(fired) == {key for key, (_, disarm) in enumerate(plan) if not disarm}
    for key, times in fired.items():
        assert len(times) == 1
        assert times[0] >= armed_at[key] + plan[key][0] - CLOCK_RESOLUTION


def test_a_timeout_fires_within_a_tick_of_its_delay() -> None:
    """Judged by the loop's own timer order, not by a wall clock: the wheel's timeout due at
    0.2 s fires before a loop timer set a tick and two clock steps later, however busy the
    machine."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        wheel = TimeoutWheel()
        order: list[str] = []
        done: asyncio.Future[None] = loop.create_future()
        start = loop.time()
        wheel.arm("wheel", 0.2, lambda: order.append("wheel"))
        later = start + 0.2 + TICK_SECONDS + 2 * CLOCK_RESOLUTION
        loop.call_at(later, lambda: (order.append("loop"), done.set_result(None)))
        await done
        wheel.close()
        return order

    assert run(main) == ["wheel", "loop"]


def test_a_shorter_timeout_armed_after_a_longer_one_fires_first() -> None:
    async def main() -> list[str]:
        wheel = TimeoutWheel()
        order: list[str] = []
        wheel.arm("long", 0.3, lambda: order.append("long"))
        wheel.arm("short", 0.02, lambda: order.append("short"))
        await asyncio.sleep(0.1)
        seen = list(order)
        await asyncio.sleep(0.3)
        wheel.close()
        return [*seen, "|", *order]

    assert run(main) == ["short", "|", "short", "long"]


def test_a_failing_callback_is_reported_and_the_others_in_its_tick_still_fire() -> None:
    async def main() -> tuple[list[str], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        wheel = TimeoutWheel()
        fired: list[str] = []

        def fail() -> None:
            raise RuntimeError("boom")

        wheel.arm("a", 0.01, lambda: fired.append("a"))
        wheel.arm("b", 0.01, fail)
        wheel.arm("c", 0.01, lambda: fired.append("c"))
        await asyncio.sleep(0.1)
        return fired, reported

    fired, reported = run(main)
    assert sorted(fired) == ["a", "c"]
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], RuntimeError)


def test_a_bucket_emptied_by_disarming_gives_its_memory_back() -> None:
    async def main() -> tuple[int, int]:
        wheel = TimeoutWheel()
        keys = [object() for _ in range(100)]
        buckets = [wheel.arm(key, 30.0, lambda: None) for key in keys]
        full = sys.getsizeof(buckets[0])
        for key, bucket in zip(keys, buckets, strict=True):
            wheel.disarm(key, bucket)
        wheel.close()
        return full, sys.getsizeof(buckets[0])

    full, emptied = run(main)
    assert emptied == sys.getsizeof({}) < full


def test_close_drops_every_armed_timeout() -> None:
    async def main() -> list[str]:
        wheel = TimeoutWheel()
        fired: list[str] = []
        wheel.arm("a", 0.01, lambda: fired.append("a"))
        wheel.close()
        await asyncio.sleep(0.05)
        return fired

    assert run(main) == []
