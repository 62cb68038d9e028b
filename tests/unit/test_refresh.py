"""When `RefreshingCredentials` fetches, under trio's autojump clock.

The fake provider's fetch sleeps (virtual time) before answering, so a test
can tell a request that waited for a fetch from one that did not: a call that
did not wait returns at the same virtual instant it was made.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from ossfs.credentials import Issued
from ossfs.errors import CredentialError
from ossfs.protocol.signing import Credentials
from ossfs.refresh import EXPIRED_RETRY, RefreshingCredentials, _Failed

EPOCH = 1_800_000_000.0
FETCH_TAKES = 2.0


def clock() -> float:
    return EPOCH + trio.current_time()


class FakeProvider:
    """Issues key N valid for *lifetime* seconds; fails while ``down``."""

    def __init__(self, lifetime: float | None = 600.0) -> None:
        self.lifetime = lifetime
        self.down = False
        self.calls: list[float] = []  # virtual times of the fetches

    async def fetch(self) -> Issued:
        self.calls.append(trio.current_time())
        await trio.sleep(FETCH_TAKES)
        if self.down:
            raise _Failed("the service answered 500")
        n = len(self.calls)
        exp = None if self.lifetime is None else clock() + self.lifetime
        return Issued(Credentials(f"key{n}", f"secret{n}", f"token{n}"), exp)


def make(provider: FakeProvider) -> RefreshingCredentials:
    return RefreshingCredentials(provider.fetch, name="the fake provider", clock=clock)


async def timed_get(creds: RefreshingCredentials) -> tuple[str, float]:
    """The key id got, and how long (virtual seconds) the call waited."""
    start = trio.current_time()
    got = await creds.get()
    return got.access_key_id, trio.current_time() - start


async def test_first_use_fetches_once_for_all_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider()
    creds = make(provider)
    got: list[str] = []

    async def one() -> None:
        got.append((await creds.get()).access_key_id)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert got == ["key1"] * 5
    assert len(provider.calls) == 1


async def test_refresh_runs_in_the_background_before_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=600.0)
    creds = make(provider)
    assert await timed_get(creds) == ("key1", FETCH_TAKES)
    issued_at = trio.current_time()
    # Until the refresh point (half the remaining life here: 300 s) nothing is fetched.
    await trio.sleep(299)
    assert await timed_get(creds) == ("key1", 0.0)
    assert len(provider.calls) == 1
    await trio.sleep(2)
    # Past it: the request is signed with the old key at once; a refresh starts.
    assert await timed_get(creds) == ("key1", 0.0)
    await trio.testing.wait_all_tasks_blocked()
    assert len(provider.calls) == 2
    assert provider.calls[1] - issued_at == pytest.approx(301)
    # While it runs, requests keep the old key and do not wait, nor start another.
    await trio.sleep(FETCH_TAKES / 2)
    assert await timed_get(creds) == ("key1", 0.0)
    assert len(provider.calls) == 2
    await trio.sleep(FETCH_TAKES)
    # The next request gets the new key, long before the old one expired.
    assert await timed_get(creds) == ("key2", 0.0)
    assert trio.current_time() - issued_at < 600


async def test_long_lived_credentials_refresh_a_quarter_hour_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=6 * 3600.0)
    creds = make(provider)
    await creds.get()
    await trio.sleep(6 * 3600 - 15 * 60 - 1)
    await creds.get()
    assert len(provider.calls) == 1
    await trio.sleep(2)
    await creds.get()
    await trio.testing.wait_all_tasks_blocked()
    assert len(provider.calls) == 2


async def test_credentials_without_expiration_are_fetched_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=None)
    creds = make(provider)
    assert await timed_get(creds) == ("key1", FETCH_TAKES)
    for _ in range(3):
        await trio.sleep(10 * 86400)
        assert await timed_get(creds) == ("key1", 0.0)
    assert len(provider.calls) == 1


async def test_failed_refresh_logs_once_keeps_the_old_key_and_retries(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ossfs.refresh")
    provider = FakeProvider(lifetime=600.0)
    creds = make(provider)
    await creds.get()
    provider.down = True
    await trio.sleep(301)
    # Requests every second for 4 minutes: the old key all along, never a wait.
    for _ in range(240):
        assert await timed_get(creds) == ("key1", 0.0)
        await trio.sleep(1)
    calls = len(provider.calls)
    # Retried, but not at every request: after an eighth of the remaining life each
    # time (37 s, 33 s, 29 s ... from 299 s down to 59 s: about a dozen times).
    assert 8 <= calls - 1 <= 16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot refresh credentials from the fake provider" in warnings[0].getMessage()
    assert "the service answered 500" in warnings[0].getMessage()
    provider.down = False
    await trio.sleep(60)
    await creds.get()  # starts the retry that works
    await trio.sleep(FETCH_TAKES + 1)
    key, waited = await timed_get(creds)
    assert key.startswith("key") and key != "key1" and waited == 0.0
    assert "refreshed after" in caplog.records[-1].getMessage()


async def test_after_expiry_requests_fail_naming_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=100.0)
    creds = make(provider)
    await creds.get()
    provider.down = True
    await trio.sleep(101)
    with pytest.raises(CredentialError) as caught:
        await creds.get()
    text = str(caught.value)
    assert "credentials from the fake provider expired at" in text
    assert "the service answered 500" in text
    assert "secret" not in text and "token" not in text
    # Within EXPIRED_RETRY the provider is not asked again: the same error at once.
    calls = len(provider.calls)
    start = trio.current_time()
    with pytest.raises(CredentialError):
        await creds.get()
    assert trio.current_time() == start and len(provider.calls) == calls
    # Then it is, and once it works again requests go on with the new key.
    provider.down = False
    await trio.sleep(EXPIRED_RETRY)
    key, waited = await timed_get(creds)
    assert key != "key1" and waited == FETCH_TAKES


async def test_first_fetch_failure_is_one_error_naming_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider()
    provider.down = True
    creds = make(provider)
    with pytest.raises(
        CredentialError,
        match="^cannot get credentials from the fake provider: the service answered 500$",
    ):
        await creds.get()


async def test_a_fetch_that_hangs_ends(autojump_clock: trio.testing.MockClock) -> None:
    async def hang() -> Issued:
        await trio.sleep_forever()
        raise AssertionError

    creds = RefreshingCredentials(hang, name="a stuck provider", clock=clock)
    with pytest.raises(CredentialError, match="stuck provider: no answer within 60 s"):
        await creds.get()


async def test_aclose_cancels_a_background_refresh(autojump_clock: trio.testing.MockClock) -> None:
    provider = FakeProvider(lifetime=10.0)
    creds = make(provider)
    await creds.get()
    await trio.sleep(6)
    await creds.get()  # starts a refresh
    await trio.testing.wait_all_tasks_blocked()
    assert len(provider.calls) == 2
    await creds.aclose()
    await trio.sleep(FETCH_TAKES * 2)
    assert creds.current is not None and creds.current.credentials.access_key_id == "key1"


async def test_a_key_the_service_refused_is_set_aside_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=600.0)
    creds = make(provider)
    first = await creds.get()
    # Refused by the service although our clock gives it 598 s more: set aside.
    assert creds.refused(first) is True
    # Other requests refused with the same key do not start more fetches ...
    assert creds.refused(first) is True
    got = await concurrent_gets(creds, 3)
    assert got == ["key2"] * 3
    assert len(provider.calls) == 2
    # ... nor does a late refusal of the key already replaced.
    assert creds.refused(first) is True
    assert (await creds.get()).access_key_id == "key2"
    assert len(provider.calls) == 2


async def test_a_refused_key_with_no_new_one_fails_naming_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=600.0)
    creds = make(provider)
    first = await creds.get()
    provider.down = True
    creds.refused(first)
    with pytest.raises(CredentialError, match="credentials from the fake provider expired at"):
        await creds.get()


async def test_keys_that_never_expire_are_not_set_aside(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(lifetime=None)
    creds = make(provider)
    first = await creds.get()
    assert creds.refused(first) is False
    assert await creds.get() is first
    assert len(provider.calls) == 1


async def concurrent_gets(creds: RefreshingCredentials, n: int) -> list[str]:
    """The key ids *n* concurrent `get` calls return."""
    got: list[str] = []

    async def one() -> None:
        got.append((await creds.get()).access_key_id)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return got
