"""`SingleFlight` under trio's autojump clock: one run for callers that come together,
and a run that fails or is cancelled does not leave the others waiting for good."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from ossfs.flight import SingleFlight

WORK_TAKES = 5.0


class Work:
    """Counts its runs; a run takes WORK_TAKES virtual seconds; the first one fails if
    ``fail_first``."""

    def __init__(self, fail_first: bool = False) -> None:
        self.runs = 0
        self.fail_first = fail_first

    async def __call__(self, value: str) -> str:
        self.runs += 1
        run = self.runs
        await trio.sleep(WORK_TAKES)
        if self.fail_first and run == 1:
            raise OSError("the work failed")
        return value


async def test_callers_that_come_together_share_one_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    got: list[tuple[str | None, float]] = []

    async def call() -> None:
        got.append((await flight.run("k", work, "made"), trio.current_time()))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call)
    assert work.runs == 1
    # The caller that ran the work gets its result; the others wait for the same run.
    assert sorted(got, key=str) == [("made", WORK_TAKES)] + [(None, WORK_TAKES)] * 4
    # Once it has ended, the next call runs again, and other keys never wait.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        nursery.start_soon(flight.run, "other", work, "x")
    assert work.runs == 3
    assert trio.current_time() == 2 * WORK_TAKES


async def _second_caller_after(
    flight: SingleFlight[str], work: Work, first_ends: str
) -> tuple[list[str | None], float]:
    """A first caller that fails or is cancelled, and a second that comes while it runs;
    what the second caller's calls returned (it calls again on None), and when."""
    results: list[str | None] = []

    async def first(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope, contextlib.suppress(OSError):
            await flight.run("k", work, "first")

    async def second() -> None:
        await trio.sleep(1)
        while True:
            results.append(await flight.run("k", work, "second"))
            if results[-1] is not None:
                return

    scope = trio.CancelScope()
    # A second caller left waiting for good fails here (virtual time: at once).
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first, scope)
            nursery.start_soon(second)
            if first_ends == "cancelled":
                await trio.sleep(2)
                scope.cancel()
    return results, trio.current_time()


@pytest.mark.parametrize("first_ends", ["cancelled", "failing"])
async def test_a_run_that_fails_or_is_cancelled_lets_the_next_caller_run(
    autojump_clock: trio.testing.MockClock, first_ends: str
) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work(fail_first=first_ends == "failing")
    results, ended = await _second_caller_after(flight, work, first_ends)
    assert work.runs == 2
    assert results == [None, "second"]
    # The second caller woke when the first run ended (at 2 when cancelled, at 5 when it
    # failed) and then ran the work itself.
    assert ended == (2 if first_ends == "cancelled" else WORK_TAKES) + WORK_TAKES


async def test_a_run_is_seen_as_running_until_it_ends_however_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work(fail_first=True)
    assert not flight.running("k")
    async with trio.open_nursery() as nursery:

        async def failing() -> None:
            with contextlib.suppress(OSError):
                await flight.run("k", work, "v")

        nursery.start_soon(failing)
        await trio.sleep(WORK_TAKES / 2)
        assert flight.running("k") and not flight.running("other")
    assert not flight.running("k")  # (it failed)
    assert await flight.run("k", work, "v") == "v"
    assert not flight.running("k")
