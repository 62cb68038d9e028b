"""Configuration: object URLs, endpoints and credentials.

Precedence, highest first: command-line options, environment variables, the
selected profile of the config file, built-in defaults.

- Object URLs: ``oss://BUCKET/KEY`` (OSS dialect) and ``s3://BUCKET/KEY``.
- Credentials: the provider chain of `ossfs.credentials` (environment, RRSA or
  web identity, the profile, the AWS files, the instance metadata service).
  None at all is an error (it would only show later as AccessDenied) unless
  anonymous access is asked for (``--anonymous``, public buckets).
- Config file: ``$OSSFS_CONFIG`` or ``~/.config/ossfs/config.toml``; one table
  per profile (``[default]``, ``[work]`` ...) with ``endpoint``, ``region``,
  ``dialect``, ``signature_version``, ``path_style``, ``access_key_id``,
  ``access_key_secret``, ``session_token``, ``credential_process``,
  ``ecs_ram_role``, ``metadata_endpoint``, ``role_arn``, ``oidc_provider_arn``,
  ``oidc_token_file``, ``web_identity_token_file``, ``role_session_name``,
  ``sts_endpoint``. A file that holds a secret and that other users can read is
  refused.

Secrets are never put in messages, logs or argv.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from ossfs.credentials import Source, Static, no_credentials_message, select_source
from ossfs.errors import UsageError
from ossfs.model import object_url
from ossfs.protocol.ops import Dialect, Endpoint

__all__ = [
    "ObjectUrl",
    "parse_object_url",
    "ConnectionOptions",
    "resolve_endpoint",
    "resolve_connection",
    "default_config_path",
    "load_profile",
    "default_cache_dir",
    "connect_as_mount",
]


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,62}$")
_PROFILE_KEYS = frozenset(
    {
        "endpoint",
        "region",
        "dialect",
        "signature_version",
        "path_style",
        "access_key_id",
        "access_key_secret",
        "session_token",
        "credential_process",
        "ecs_ram_role",
        "metadata_endpoint",
        "role_arn",
        "oidc_provider_arn",
        "oidc_token_file",
        "web_identity_token_file",
        "role_session_name",
        "sts_endpoint",
    }
)
_SECRET_KEYS = frozenset({"access_key_secret", "session_token"})


@dataclass(frozen=True, slots=True)
class ObjectUrl:
    """A parsed ``oss://bucket/key`` or ``s3://bucket/key``."""

    scheme: Dialect
    bucket: str
    key: str

    def __str__(self) -> str:
        return object_url(self.scheme, self.bucket, self.key)


def parse_object_url(text: str) -> ObjectUrl:
    """Parse an object or prefix URL; raise UsageError with a hint when it is not one."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("oss", "s3"):
        raise UsageError(
            f"not an object URL: {text!r} (expected oss://BUCKET/KEY or s3://BUCKET/KEY)"
        )
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise UsageError(f"not a valid bucket name: {bucket!r} in {text!r}")
    return ObjectUrl(cast(Dialect, scheme.lower()), bucket, key)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOptions:
    """What the command line said about the connection (None: not given)."""

    endpoint: str | None = None
    region: str | None = None
    dialect: Dialect | None = None
    signature_version: Literal["v1", "v4"] | None = None
    path_style: bool | None = None
    profile: str | None = None
    config_path: str | None = None
    anonymous: bool = False


def default_cache_dir(endpoint_url: str, bucket: str, env: Mapping[str, str] | None = None) -> str:
    """``~/.cache/ossfs/<host_port>/<bucket>`` (or under ``$XDG_CACHE_HOME``): one cache
    per endpoint and bucket."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    host = "".join(c if c.isalnum() or c in ".-" else "_" for c in urlsplit(endpoint_url).netloc)
    return os.path.join(base, "ossfs", host or "default", bucket)


def connect_as_mount(opts: ConnectionOptions, mount: Mapping[str, Any]) -> ConnectionOptions:
    """*opts* completed from a running mount's description (``user.ossfs.mount``): its
    endpoint, dialect, config file, profile, signing and addressing, unless *opts* says
    otherwise. So a command given a path inside a mount finds the mount's credentials."""
    return ConnectionOptions(
        endpoint=opts.endpoint or mount["endpoint"],
        region=opts.region or mount.get("region"),
        dialect=opts.dialect or mount["dialect"],
        signature_version=opts.signature_version or mount.get("signature_version"),
        path_style=opts.path_style if opts.path_style is not None else mount.get("path_style"),
        profile=opts.profile or mount.get("profile"),
        config_path=opts.config_path or mount.get("config_path"),
        anonymous=opts.anonymous or bool(mount.get("anonymous")),
    )


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("OSSFS_CONFIG"):
        return Path(env["OSSFS_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ossfs" / "config.toml"


def load_profile(path: Path, name: str, *, required: bool) -> dict[str, Any]:
    """Read one profile table from the config file.

    A missing file or profile is an error only when *required* (the user named
    a profile or a file). A file that holds secrets must not be readable by
    group or others.
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        doc = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    profile = doc.get(name)
    if profile is None:
        if required:
            known = ", ".join(sorted(k for k, v in doc.items() if isinstance(v, dict))) or "none"
            raise UsageError(f"profile {name!r} not found in {path} (profiles: {known})")
        return {}
    if not isinstance(profile, dict):
        raise UsageError(f"profile {name!r} in {path} must be a table")
    unknown = set(profile) - _PROFILE_KEYS
    if unknown:
        raise UsageError(
            f"unknown setting(s) {', '.join(sorted(unknown))} in profile {name!r} of {path}"
        )
    if _SECRET_KEYS & set(profile) and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"config file {path} holds secrets but other users can read it; run: chmod 600 {path}"
        )
    return profile


def _region_from_host(host: str, dialect: Dialect) -> str | None:
    if dialect == "oss":
        m = re.match(r"^(?:[^.]+\.)?oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$", host)
        if m:
            return m.group(1)
    else:
        m = re.match(r"^(?:[^.]+\.)?s3[.-]([a-z0-9-]+)\.amazonaws\.com$", host)
        if m:
            return m.group(1)
    return None


# The region of a connection that names none, and whose endpoint does not tell.
_DEFAULT_REGION: dict[Dialect, str] = {"oss": "cn-hangzhou", "s3": "us-east-1"}


def resolve_endpoint(
    opts: ConnectionOptions, url_scheme: Dialect, env: Mapping[str, str] | None = None
) -> Endpoint:
    """Combine options, environment and profile into an `Endpoint`.

    Its credentials are those of a static source; a source to fetch from (see
    `resolve_connection`) leaves them None.
    """
    return resolve_connection(opts, url_scheme, env)[0]


def resolve_connection(
    opts: ConnectionOptions, url_scheme: Dialect, env: Mapping[str, str] | None = None
) -> tuple[Endpoint, Source | None]:
    """The `Endpoint`, and where its credentials come from: a `Static` source (its
    key is on the endpoint too), a source to fetch from, or None (anonymous)."""
    env = os.environ if env is None else env
    required = opts.profile is not None or opts.config_path is not None
    path = Path(opts.config_path) if opts.config_path else default_config_path(env)
    profile_name = opts.profile or env.get("OSSFS_PROFILE") or "default"
    profile = load_profile(path, profile_name, required=required)

    dialect = cast(Dialect, opts.dialect or profile.get("dialect") or url_scheme)
    if dialect not in ("oss", "s3"):
        raise UsageError(f"unknown dialect {dialect!r} (use oss or s3)")

    env_region = env.get("OSS_REGION") if dialect == "oss" else env.get("AWS_REGION")
    region = opts.region or env_region or profile.get("region")
    raw = opts.endpoint or profile.get("endpoint")
    url, host = _endpoint_url(raw) if raw else (None, None)
    if not region and host is not None:
        region = _region_from_host(host, dialect)
    region = region or _DEFAULT_REGION[dialect]
    if url is None:
        url = (
            f"https://oss-{region}.aliyuncs.com"
            if dialect == "oss"
            else f"https://s3.{region}.amazonaws.com"
        )

    sigv = opts.signature_version or profile.get("signature_version") or "v4"
    if sigv not in ("v1", "v4"):
        raise UsageError(f"unknown signature version {sigv!r} (use v1 or v4)")
    path_style = opts.path_style
    if path_style is None and "path_style" in profile:
        path_style = bool(profile["path_style"])

    creds = None
    source: Source | None = None
    if not opts.anonymous:
        where = f"profile {profile_name!r} of {path}"
        source = select_source(dialect, env, profile, where, region=region)
        if source is None:
            raise UsageError(no_credentials_message(dialect, env, where))
        if isinstance(source, Static):
            creds = source.credentials
    endpoint = Endpoint(
        url=url,
        dialect=dialect,
        region=region,
        signature_version=cast(Literal["v1", "v4"], sigv),
        path_style=path_style,
        credentials=creds,
    )
    return endpoint, source


def _endpoint_url(raw: str) -> tuple[str, str]:
    """The endpoint's ``scheme://host[:port]`` (https when not given) and its host name."""
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not an endpoint URL: {raw!r}")
    if parts.path not in ("", "/") or parts.query:
        raise UsageError(f"endpoint {raw!r} must not have a path or query")
    return f"{parts.scheme}://{parts.netloc}", parts.hostname
