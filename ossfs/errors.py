"""The exceptions ossfs raises, and how each maps to an errno.

::

    OssfsError                      anything ossfs reports to a user
    ├── UsageError                  bad command-line input or configuration
    ├── CredentialError             a credentials provider gave none, or they expired (EACCES)
    ├── ServiceError                the object store answered with an error
    │   ├── NotFoundError           NoSuchKey, NoSuchBucket (ENOENT)
    │   ├── AccessError             AccessDenied, bad signature or key (EACCES)
    │   ├── ObjectChangedError      PreconditionFailed on If-Match (EIO)
    │   └── ArchivedObjectError     InvalidObjectState: archive not restored (EIO)
    ├── TransferError               network failure after all retries (EIO)
    │   └── GaveUpError             a request's whole retry cycle failed (attempts or deadline)
    ├── ListingError                a listing loops, goes back, or is too long (EIO)
    ├── IntegrityError              a CRC-64 or MD5 does not match (EIO)
    ├── CheckpointError             a checkpoint cannot be used or written
    └── NoSpaceError                the disk (or quota) for data or a checkpoint is full

The CLI prints ``str(error)`` as one line and exits non-zero; a traceback is
only for bugs. The FUSE layer turns these into errnos with `errno_for`.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "OssfsError",
    "UsageError",
    "CredentialError",
    "ServiceError",
    "NotFoundError",
    "AccessError",
    "ObjectChangedError",
    "ArchivedObjectError",
    "TransferError",
    "GaveUpError",
    "ListingError",
    "IntegrityError",
    "CheckpointError",
    "NoSpaceError",
    "service_error",
    "errno_for",
    "first_error",
    "unwrap_groups",
]


class OssfsError(Exception):
    """Base of every error ossfs reports to a user."""


class UsageError(OssfsError):
    """The user asked for something that cannot be done as asked."""


class CredentialError(OssfsError):
    """No usable credentials: the provider failed, or its credentials expired
    and could not be renewed. The message names the provider."""


class ServiceError(OssfsError):
    """An error response from the object store.

    :status: HTTP status code (0 when there was no response).
    :code: the service's error code, e.g. ``NoSuchKey``.
    :message: the service's message.
    :request_id: ``x-oss-request-id`` / ``x-amz-request-id`` when known.
    :ec: OSS's ``EC`` diagnostic code when present.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str = "",
        request_id: str | None = None,
        *,
        ec: str | None = None,
        resource: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.ec = ec
        self.resource = resource
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.code} (HTTP {self.status})"
        if self.resource:
            text += f" on {self.resource}"
        if self.message:
            text += f": {self.message}"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


class NotFoundError(ServiceError):
    """The key or the bucket does not exist."""


class AccessError(ServiceError):
    """Access was refused: missing rights, a bad key id or a bad signature."""


class ObjectChangedError(ServiceError):
    """The object changed since its ETag was read (a failed If-Match)."""


class ArchivedObjectError(ServiceError):
    """The object is in an archive storage class and has not been restored."""


class TransferError(OssfsError):
    """The transfer failed after every retry (connection errors, stalls, truncation)."""


class GaveUpError(TransferError):
    """One request ran its whole retry cycle and failed.

    Raised by the client when the attempts that may be retried are used up or
    the request's deadline passed (``docs/semantics.md``, "Time bounds"):
    asking again at once would wait as long again, most likely for nothing.

    :attempts: requests sent in the cycle.
    :elapsed: seconds the cycle took.
    :timed_out: the deadline ended it (not the count of attempts).
    """

    def __init__(self, message: str, *, attempts: int, elapsed: float, timed_out: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.elapsed = elapsed
        self.timed_out = timed_out


class ListingError(OssfsError):
    """A listing cannot be followed to its end.

    The service's pages loop or go back (a continuation token that repeats,
    keys that do not increase), or a directory has more entries than the mount
    may hold.
    """


class IntegrityError(OssfsError):
    """Downloaded bytes do not match the checksum the service published."""


class CheckpointError(OssfsError):
    """A checkpoint or cache index cannot be used, or cannot be written."""


class NoSpaceError(OssfsError):
    """No space left on the disk (or quota) a download, checkpoint or cache writes to.

    Raised instead of the bare ``OSError``; what was written and recorded
    before stays, so the same command resumes once space is freed.

    :path: the file or directory that could not be written.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


_CODE_CLASSES: dict[str, type[ServiceError]] = {
    "NoSuchKey": NotFoundError,
    "NoSuchBucket": NotFoundError,
    "NotFound": NotFoundError,
    "AccessDenied": AccessError,
    "SignatureDoesNotMatch": AccessError,
    "InvalidAccessKeyId": AccessError,
    "InvalidSecurityToken": AccessError,
    "SecurityTokenExpired": AccessError,
    "ExpiredToken": AccessError,
    "RequestTimeTooSkewed": AccessError,
    "Forbidden": AccessError,
    "PreconditionFailed": ObjectChangedError,
    "InvalidObjectState": ArchivedObjectError,
}


def service_error(
    status: int,
    code: str,
    message: str = "",
    request_id: str | None = None,
    *,
    ec: str | None = None,
    resource: str | None = None,
) -> ServiceError:
    """Build the most specific `ServiceError` subclass for a code and status."""
    cls = _CODE_CLASSES.get(code)
    if cls is None:
        if status == 404:
            cls = NotFoundError
        elif status == 403:
            cls = AccessError
        elif status == 412:
            cls = ObjectChangedError
        else:
            cls = ServiceError
    return cls(status, code, message, request_id, ec=ec, resource=resource)


def first_error(exc: BaseException) -> BaseException:
    """The error to report from a (possibly nested) exception group.

    Concurrent tasks fail together: a Ctrl-C beats everything, then an
    `OssfsError` (the one a user can act on), then anything else.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    for kind in (KeyboardInterrupt, OssfsError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else exc


@contextmanager
def unwrap_groups() -> Iterator[None]:
    """Let the most meaningful error of a nursery's exception group through, alone."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = first_error(group)
        raise error from error.__cause__  # its own cause kept (not the group)


def errno_for(exc: BaseException) -> int:
    """The errno a filesystem call should fail with for *exc*."""
    if isinstance(exc, NotFoundError):
        return errno.ENOENT
    if isinstance(exc, (AccessError, CredentialError)):
        return errno.EACCES
    if isinstance(exc, ObjectChangedError):
        # Not ESTALE: tools take that for a stale NFS handle; the next open sees
        # the new version (docs/semantics.md).
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
