"""Fetch credentials from their source, and keep temporary ones fresh.

`RefreshingCredentials.get` is called before every request is signed. It
never waits while the credentials it holds are valid:

- a *refresh point* lies a safe margin before the expiration (a quarter of an
  hour, or half the credentials' remaining life when that is shorter). The
  first request past it starts one refresh in the background and is signed
  with the current credentials, as is every request until the new ones
  arrive; requests already sent keep what they were signed with.
- a refresh that fails while the current credentials are still valid is
  logged once (a warning naming the provider) and tried again later (after an
  eighth of the remaining life, between 1 s and 60 s); the credentials in hand
  go on being used.
- with no valid credentials (the first request, or after they expired) a
  request waits for a fetch, shared by all requests waiting then. When that
  fails the request fails with `CredentialError`, one line naming the provider,
  and for the next 5 s requests fail at once with the same error instead of
  asking the provider again.

- the service's clock has the last word: a request refused because its key
  has expired (`refused`; a moment before our clock says so, or with clocks
  apart) sets that key aside and is sent again with new ones; when none can be
  had it fails with the same one line.

Nothing runs while no request comes: an idle mount asks for new credentials
at its next request (which then waits for them if they have expired).
Background refreshes run as trio system tasks, so the client needs no nursery;
`aclose` cancels one still running.

The sources (`ossfs.credentials`): a credential process (run with
`trio.run_process`, at most 60 s), the ECS and EC2 instance metadata services
(a session token first: ``PUT /latest/api/token``), Alibaba Cloud STS
AssumeRoleWithOIDC (RRSA) and AWS STS AssumeRoleWithWebIdentity.

Must not import: pyfuse3.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import httpx
import trio

from ossfs import __version__
from ossfs.credentials import (
    METADATA_TOKEN_TTL,
    ROLE_DURATION,
    AssumeRoleWithToken,
    InstanceRole,
    Issued,
    Process,
    Source,
    Static,
    describe_failure,
    parse_metadata_credentials,
    parse_oidc_answer,
    parse_process_output,
    parse_web_identity_answer,
)
from ossfs.errors import CredentialError
from ossfs.escape import printable
from ossfs.model import utc_stamp
from ossfs.protocol.signing import Credentials

__all__ = ["RefreshingCredentials", "fetch_source", "for_source"]

log = logging.getLogger(__name__)

# A refresh starts this long before the expiration at most (half the remaining
# life when that is shorter).
REFRESH_MARGIN = 15 * 60.0
# Retries of a failed refresh while the credentials in hand are valid.
RETRY_MIN = 1.0
RETRY_MAX = 60.0
# After a failed fetch with no valid credentials, requests fail at once this long.
EXPIRED_RETRY = 5.0
# The most one fetch may take, whatever the source.
FETCH_TIMEOUT = 60.0
# A metadata service is on the machine's own link: a short connect timeout keeps
# the chain's last step quick where there is none.
METADATA_CONNECT_TIMEOUT = 1.0
METADATA_TIMEOUT = 5.0
STS_CONNECT_TIMEOUT = 10.0
STS_TIMEOUT = 30.0
# The most of an answer read from a metadata service or STS.
ANSWER_LIMIT = 64 * 1024
_USER_AGENT = f"ossfs/{__version__}"


class _Failed(Exception):
    """A source gave no credentials; the message says why (never a secret)."""


class RefreshingCredentials:
    """Credentials from one source, fetched on first use and refreshed before they expire.

    :fetch: gets new credentials; raises `_Failed` (or `CredentialError`).
    :name: the provider, for log lines.
    :failure: makes the error a request gets when no credentials could be had.
    :clock: seconds since the epoch (expirations are wall-clock times).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Issued]],
        *,
        name: str,
        failure: Callable[[str], CredentialError] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self.name = name
        self._failure = failure or (
            lambda reason: CredentialError(f"cannot get credentials from {name}: {reason}")
        )
        self._clock = clock
        self._issued: Issued | None = None
        self._refresh_at = math.inf
        self._retry_at = -math.inf
        self._error: CredentialError | None = None
        self._inflight: trio.Event | None = None
        self._failures = 0  # failed refreshes in a row while valid credentials were in hand
        self._closed = False
        self._background: trio.CancelScope | None = None
        self.fetches = 0  # fetches started (tests and `ossfs status` read it)

    @property
    def current(self) -> Issued | None:
        return self._issued

    async def get(self) -> Credentials:
        """Credentials to sign a request with now; waits only when none are valid."""
        now = self._clock()
        issued = self._issued
        if issued is not None and _valid(issued, now):
            if now >= self._refresh_at and now >= self._retry_at and self._inflight is None:
                self._start_background()
            return issued.credentials
        if self._inflight is None:
            if self._error is not None and now < self._retry_at:
                raise self._error
            await self._refresh(background=False)
        else:
            await self._inflight.wait()
        issued = self._issued
        if issued is not None and _valid(issued, self._clock()):
            return issued.credentials
        raise self._error or self._failure("no credentials")

    def refused(self, credentials: Credentials) -> bool:
        """The service said *credentials* have expired (its clock, not ours, has the
        last word). When they are the ones in hand they are set aside, so the next
        `get` fetches new ones (one fetch, shared) and, if that fails, raises the
        error naming this provider. True when a new attempt may use other
        credentials; False for credentials that never expire."""
        issued = self._issued
        if issued is None or issued.credentials is not credentials:
            return True  # already replaced: the next attempt uses the new ones
        if issued.expiration is None:
            return False
        now = self._clock()
        if _valid(issued, now):
            log.info(
                "the service refused the credentials from %s as expired (they were "
                "valid until %s by this machine's clock); getting new ones",
                self.name,
                utc_stamp(issued.expiration),
            )
            self._issued = Issued(credentials=credentials, expiration=now)
            self._refresh_at = now
        return True

    async def aclose(self) -> None:
        self._closed = True
        if self._background is not None:
            self._background.cancel()

    def _start_background(self) -> None:
        self._inflight = trio.Event()
        scope = self._background = trio.CancelScope()
        if self._closed:
            scope.cancel()

        async def run() -> None:
            # A system task's exception would end the whole trio run (the mount).
            try:
                with scope:
                    await self._refresh(background=True)
            except Exception:  # pragma: no cover - _refresh catches what a fetch raises
                log.exception("refreshing credentials from %s", self.name)

        trio.lowlevel.spawn_system_task(run, name=f"refresh credentials from {self.name}")

    async def _refresh(self, *, background: bool) -> None:
        if self._inflight is None:
            self._inflight = trio.Event()
        event = self._inflight
        self.fetches += 1
        try:
            reason = None
            issued: Issued | None = None
            with trio.move_on_after(FETCH_TIMEOUT) as scope:
                try:
                    issued = await self._fetch()
                except _Failed as e:
                    reason = str(e)
                except CredentialError as e:
                    reason = str(e)
                except Exception as e:  # noqa: BLE001 - a provider's bug must not end a mount
                    reason = f"{type(e).__name__}: {printable(e)}"
            if scope.cancelled_caught:
                reason = f"no answer within {FETCH_TIMEOUT:.0f} s"
            if reason is None and issued is not None:
                self._succeeded(issued)
            else:
                self._failed(reason or "no credentials", background=background)
        finally:
            self._inflight = None
            event.set()

    def _succeeded(self, issued: Issued) -> None:
        now = self._clock()
        if self._failures:
            log.warning(
                "credentials from %s refreshed after %d failed attempt(s)%s",
                self.name,
                self._failures,
                _until(issued),
            )
        elif self._issued is not None:
            log.info("credentials from %s refreshed%s", self.name, _until(issued))
        self._issued = issued
        self._error = None
        self._failures = 0
        self._retry_at = -math.inf
        if issued.expiration is None:
            self._refresh_at = math.inf
        else:
            remaining = issued.expiration - now
            self._refresh_at = issued.expiration - min(REFRESH_MARGIN, max(0.0, remaining / 2))

    def _failed(self, reason: str, *, background: bool) -> None:
        now = self._clock()
        issued = self._issued
        if issued is not None and _valid(issued, now):
            assert issued.expiration is not None
            remaining = issued.expiration - now
            delay = min(RETRY_MAX, max(RETRY_MIN, remaining / 8))
            self._retry_at = now + delay
            self._failures += 1
            if self._failures == 1:
                log.warning(
                    "cannot refresh credentials from %s: %s; the current ones are "
                    "valid until %s; trying again in %.0f s",
                    self.name,
                    reason,
                    utc_stamp(issued.expiration),
                    delay,
                )
            else:
                log.debug("refreshing credentials from %s failed again: %s", self.name, reason)
            return
        self._retry_at = now + EXPIRED_RETRY
        if issued is not None and issued.expiration is not None:
            self._error = CredentialError(
                f"credentials from {self.name} expired at {utc_stamp(issued.expiration)} and new "
                f"ones could not be had: {reason}"
            )
        else:
            self._error = self._failure(reason)
        if background:  # pragma: no cover - a background refresh starts only while valid
            log.error("%s", self._error)


def _valid(issued: Issued, now: float) -> bool:
    return issued.expiration is None or now < issued.expiration


def _until(issued: Issued) -> str:
    return f" (valid until {utc_stamp(issued.expiration)})" if issued.expiration else ""


def for_source(source: Source, *, clock: Callable[[], float] = time.time) -> RefreshingCredentials:
    """A `RefreshingCredentials` that fetches from *source*."""

    async def fetch() -> Issued:
        return await fetch_source(source)

    return RefreshingCredentials(
        fetch,
        name=source.name,
        failure=lambda reason: describe_failure(source, reason),
        clock=clock,
    )


async def fetch_source(source: Source) -> Issued:
    """New credentials from *source*; raises `_Failed` saying why there are none."""
    if isinstance(source, Static):
        return Issued(source.credentials)
    if isinstance(source, Process):
        return await _run_process(source)
    if isinstance(source, InstanceRole):
        return await _instance_role(source)
    return await _assume_role(source)


# ------------------------------------------------------------------ credential process


PROCESS_TIMEOUT = 60.0
_STDERR_LIMIT = 200


async def _run_process(source: Process) -> Issued:
    import shlex

    argv = shlex.split(source.command)
    program = printable(argv[0])
    try:
        with trio.move_on_after(PROCESS_TIMEOUT) as scope:
            result = await trio.run_process(
                argv,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
            )
    except OSError as e:
        raise _Failed(f"cannot run {program}: {e.strerror or e}") from None
    if scope.cancelled_caught:
        raise _Failed(f"{program} did not finish within {PROCESS_TIMEOUT:.0f} s")
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        said = f": {printable(lines[-1][:_STDERR_LIMIT])}" if lines else ""
        raise _Failed(f"{program} exited with status {result.returncode}{said}")
    try:
        return parse_process_output(result.stdout)
    except ValueError as e:
        raise _Failed(f"{program}: {e}") from None


# ------------------------------------------------------------------ HTTP


def _tls() -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE") or None,
        capath=os.environ.get("SSL_CERT_DIR") or None,
    )


def _client(*, metadata: bool) -> httpx.AsyncClient:
    if metadata:
        # The metadata service is on this machine's link: never through a proxy.
        return httpx.AsyncClient(
            timeout=httpx.Timeout(METADATA_TIMEOUT, connect=METADATA_CONNECT_TIMEOUT),
            trust_env=False,
            headers={"User-Agent": _USER_AGENT},
            follow_redirects=False,
        )
    return httpx.AsyncClient(
        timeout=httpx.Timeout(STS_TIMEOUT, connect=STS_CONNECT_TIMEOUT),
        verify=_tls(),
        headers={"User-Agent": _USER_AGENT},
        follow_redirects=False,
    )


async def _call(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    data: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """Status and (at most `ANSWER_LIMIT` bytes of) body; `_Failed` on a network error."""
    try:
        async with client.stream(method, url, headers=headers, data=data) as resp:
            body = b""
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > ANSWER_LIMIT:
                    raise _Failed(f"{method} {url}: the answer is longer than {ANSWER_LIMIT} bytes")
            return resp.status_code, body
    except httpx.TimeoutException:
        raise _Failed(f"{method} {url}: no answer in time") from None
    except httpx.HTTPError as e:
        text = printable(str(e)[:200]) or type(e).__name__
        raise _Failed(f"{method} {url}: {text}") from None


def _status_line(method: str, url: str, status: int, body: bytes) -> str:
    said = (
        printable(body[:200].decode(errors="replace").strip().splitlines()[0])
        if body.strip()
        else ""
    )
    return f"{method} {url} answered {status}" + (f": {said}" if said else "")


# ------------------------------------------------------------------ metadata services


async def _instance_role(source: InstanceRole) -> Issued:
    if source.flavor == "ecs":
        base = f"{source.endpoint}/latest/meta-data/ram/security-credentials/"
        ttl_header, token_header = (
            "X-aliyun-ecs-metadata-token-ttl-seconds",
            "X-aliyun-ecs-metadata-token",
        )
    else:
        base = f"{source.endpoint}/latest/meta-data/iam/security-credentials/"
        ttl_header, token_header = (
            "X-aws-ec2-metadata-token-ttl-seconds",
            "X-aws-ec2-metadata-token",
        )
    async with _client(metadata=True) as client:
        # The hardened mode (ECS) / IMDSv2 (EC2): a session token first, sent with
        # every request after. A service that refuses it is asked without one,
        # unless the token is required.
        token_url = f"{source.endpoint}/latest/api/token"
        status, body = await _call(
            client, "PUT", token_url, headers={ttl_header: str(METADATA_TOKEN_TTL)}
        )
        headers: dict[str, str] = {}
        if status == 200 and body.strip():
            headers[token_header] = body.decode(errors="replace").strip()
        elif source.require_token:
            raise _Failed(
                _status_line("PUT", token_url, status, body) + " (a metadata token is required)"
            )
        role = source.role
        if not role:
            status, body = await _call(client, "GET", base, headers=headers)
            if status != 200:
                raise _Failed(
                    _status_line("GET", base, status, body) + " (asking which role is attached)"
                )
            names = body.decode(errors="replace").split()
            if not names:
                raise _Failed(f"no role is attached to this instance ({base} is empty)")
            role = names[0]
        url = base + quote(role, safe="")
        status, body = await _call(client, "GET", url, headers=headers)
        if status != 200:
            raise _Failed(_status_line("GET", url, status, body))
        try:
            return parse_metadata_credentials(body, source.flavor)
        except ValueError as e:
            raise _Failed(f"GET {url}: {e}") from None


# ------------------------------------------------------------------ STS


async def _assume_role(source: AssumeRoleWithToken) -> Issued:
    try:
        with open(source.token_file, "rb") as f:  # read each time: it is rotated
            token = f.read(64 * 1024).decode().strip()
    except OSError as e:
        raise _Failed(
            f"cannot read the token file {printable(source.token_file)}: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError:
        raise _Failed(f"the token file {printable(source.token_file)} is not text") from None
    if not token:
        raise _Failed(f"the token file {printable(source.token_file)} is empty")
    url = source.sts_endpoint + "/"
    if source.flavor == "oidc":
        form = {
            "Action": "AssumeRoleWithOIDC",
            "Version": "2015-04-01",
            "Format": "JSON",
            "Timestamp": utc_stamp(time.time()),
            "RoleArn": source.role_arn,
            "OIDCProviderArn": source.provider_arn or "",
            "OIDCToken": token,
            "RoleSessionName": source.session_name,
            "DurationSeconds": str(ROLE_DURATION),
        }
        parse = parse_oidc_answer
    else:
        form = {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": source.role_arn,
            "RoleSessionName": source.session_name,
            "WebIdentityToken": token,
            "DurationSeconds": str(ROLE_DURATION),
        }
        parse = parse_web_identity_answer
    async with _client(metadata=False) as client:
        status, body = await _call(client, "POST", url, data=form)
    try:
        return parse(status, body)
    except ValueError as e:
        raise _Failed(str(e)) from None
