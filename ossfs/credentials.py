"""Where credentials come from: the provider chain, and reading what providers answer.

`select_source` walks the chain in its documented order (docs/configuration.md,
"Credentials") and returns the first source that is configured:

- OSS (``oss://`` and the OSS dialect): ``OSS_ACCESS_KEY_ID``/... or
  ``ALIBABA_CLOUD_ACCESS_KEY_ID``/... in the environment; RRSA (the
  ``ALIBABA_CLOUD_ROLE_ARN``, ``ALIBABA_CLOUD_OIDC_PROVIDER_ARN``,
  ``ALIBABA_CLOUD_OIDC_TOKEN_FILE`` trio, exchanged through STS
  AssumeRoleWithOIDC); the ossfs profile (keys, ``credential_process``,
  ``ecs_ram_role`` or an OIDC role); the ECS RAM role of the instance metadata
  service, unless ``ALIBABA_CLOUD_ECS_METADATA_DISABLED`` is true.
- S3: ``AWS_ACCESS_KEY_ID``/...; web identity (``AWS_ROLE_ARN`` and
  ``AWS_WEB_IDENTITY_TOKEN_FILE``, STS AssumeRoleWithWebIdentity); the ossfs
  profile; the AWS shared files (``~/.aws/credentials`` and ``~/.aws/config``,
  profile ``AWS_PROFILE``: keys, ``credential_process`` or a web identity
  role); IMDSv2, unless ``AWS_EC2_METADATA_DISABLED`` is true.

Choosing a source only reads the environment and files; nothing here talks to
the network. `Static` credentials are used as they are; every other source is
fetched, and kept fresh, by `ossfs.refresh`. The parsers of what the sources
answer (a credential process's JSON, the metadata services' JSON, STS's JSON
and XML) are here too, so that they are tested without a network.

Secrets never appear in a source's ``repr`` or ``name``, nor in any message.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ossfs.errors import CredentialError, UsageError
from ossfs.escape import printable
from ossfs.protocol.signing import Credentials

__all__ = [
    "Issued",
    "Static",
    "Process",
    "InstanceRole",
    "AssumeRoleWithToken",
    "Source",
    "select_source",
    "parse_time",
    "parse_process_output",
    "parse_metadata_credentials",
    "parse_oidc_answer",
    "parse_web_identity_answer",
    "ECS_METADATA",
    "EC2_METADATA",
    "ALIBABA_STS",
]

ECS_METADATA = "http://100.100.100.200"
EC2_METADATA = "http://169.254.169.254"
ALIBABA_STS = "https://sts.aliyuncs.com"
# Both metadata services give out tokens for at most six hours.
METADATA_TOKEN_TTL = 21600
# What an STS exchange asks for (both services accept 900 s up to the role's maximum).
ROLE_DURATION = 3600
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class Issued:
    """Credentials and when they stop working (seconds since the epoch; None: never)."""

    credentials: Credentials
    expiration: float | None = None


@dataclass(frozen=True, slots=True)
class Static:
    """An access key given as it is (environment, profile)."""

    name: str
    credentials: Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class Process:
    """A command that prints credentials as JSON (``credential_process``)."""

    command: str
    where: str  # where the command was configured

    @property
    def name(self) -> str:
        argv = _split(self.command, self.where)
        # Only the program: arguments may carry something private.
        return f"credential_process {printable(argv[0])!s} ({self.where})"


@dataclass(frozen=True, slots=True)
class InstanceRole:
    """The role of this machine, from its instance metadata service.

    :flavor: ``ecs`` (Alibaba Cloud ECS RAM role) or ``ec2`` (AWS IMDSv2).
    :endpoint: ``http://host[:port]`` of the metadata service.
    :role: the role name, or None to ask the service which role is attached.
    :require_token: fail instead of falling back to requests without a
        session token when the token request is refused.
    :fallback: set when this source was chosen only because nothing else was
        configured: what was looked for, for the message when it fails too.
    """

    flavor: Literal["ecs", "ec2"]
    endpoint: str
    role: str | None = None
    require_token: bool = False
    fallback: str | None = None

    @property
    def name(self) -> str:
        what = "ECS RAM role" if self.flavor == "ecs" else "EC2 instance role"
        role = f" {self.role!r}" if self.role else ""
        return f"the {what}{role} (metadata service {self.endpoint})"


@dataclass(frozen=True, slots=True)
class AssumeRoleWithToken:
    """A role assumed with an OIDC token read from a file, through STS.

    :flavor: ``oidc`` (Alibaba Cloud RRSA, AssumeRoleWithOIDC) or
        ``web_identity`` (AWS AssumeRoleWithWebIdentity).
    :provider_arn: the OIDC provider's ARN (Alibaba Cloud only).
    """

    flavor: Literal["oidc", "web_identity"]
    role_arn: str
    token_file: str
    sts_endpoint: str
    session_name: str
    where: str
    provider_arn: str | None = None

    @property
    def name(self) -> str:
        call = "AssumeRoleWithOIDC" if self.flavor == "oidc" else "AssumeRoleWithWebIdentity"
        return f"{call} of role {printable(self.role_arn)} at {self.sts_endpoint} ({self.where})"


Source = Static | Process | InstanceRole | AssumeRoleWithToken


# ------------------------------------------------------------------------- the chain


def select_source(
    dialect: Literal["oss", "s3"],
    env: Mapping[str, str],
    profile: Mapping[str, Any],
    profile_where: str,
    *,
    region: str,
) -> Source | None:
    """The first configured source of the chain for *dialect*, or None.

    *profile* is the selected table of the ossfs config file, *profile_where*
    says which (``profile 'x' of PATH``). Raises UsageError for a source that
    is configured only in part (a key id without a secret, two of the three
    RRSA variables ...).
    """
    if dialect == "oss":
        return (
            _env_keys(env, "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
            or _env_keys(
                env,
                "ALIBABA_CLOUD_ACCESS_KEY_ID",
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
                "ALIBABA_CLOUD_SECURITY_TOKEN",
            )
            or _rrsa_env(env)
            or _from_profile(profile, profile_where, dialect, env, region)
            or _ecs_role(env, profile, _nothing_found(dialect, env, profile_where))
        )
    return (
        _env_keys(env, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        or _web_identity_env(env, region)
        or _from_profile(profile, profile_where, dialect, env, region)
        or _aws_shared_files(env, region)
        or _ec2_role(env, profile, _nothing_found(dialect, env, profile_where))
    )


def _truthy(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def _env_keys(env: Mapping[str, str], ak: str, sk: str, token: str) -> Static | None:
    key_id, secret = env.get(ak), env.get(sk)
    if not (key_id or secret):
        return None
    if not (key_id and secret):
        missing = sk if key_id else ak
        raise UsageError(f"{missing} is not set ({ak} and {sk} go together)")
    return Static(ak, Credentials(key_id, secret, env.get(token) or None))


def _rrsa_env(env: Mapping[str, str]) -> AssumeRoleWithToken | None:
    names = (
        "ALIBABA_CLOUD_ROLE_ARN",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
    )
    given = [n for n in names if env.get(n)]
    if not given:
        return None
    if len(given) < len(names):
        missing = ", ".join(n for n in names if n not in given)
        raise UsageError(
            f"{missing} not set (RRSA needs ALIBABA_CLOUD_ROLE_ARN, "
            "ALIBABA_CLOUD_OIDC_PROVIDER_ARN and ALIBABA_CLOUD_OIDC_TOKEN_FILE)"
        )
    return AssumeRoleWithToken(
        flavor="oidc",
        role_arn=env["ALIBABA_CLOUD_ROLE_ARN"],
        provider_arn=env["ALIBABA_CLOUD_OIDC_PROVIDER_ARN"],
        token_file=env["ALIBABA_CLOUD_OIDC_TOKEN_FILE"],
        sts_endpoint=_alibaba_sts(env.get("ALIBABA_CLOUD_STS_ENDPOINT")),
        session_name=_session_name(env.get("ALIBABA_CLOUD_ROLE_SESSION_NAME")),
        where="RRSA: ALIBABA_CLOUD_ROLE_ARN",
    )


def _web_identity_env(env: Mapping[str, str], region: str) -> AssumeRoleWithToken | None:
    arn, token_file = env.get("AWS_ROLE_ARN"), env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if not (arn or token_file):
        return None
    if not (arn and token_file):
        missing = "AWS_WEB_IDENTITY_TOKEN_FILE" if arn else "AWS_ROLE_ARN"
        raise UsageError(
            f"{missing} is not set (AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE go together)"
        )
    return AssumeRoleWithToken(
        flavor="web_identity",
        role_arn=arn,
        token_file=token_file,
        sts_endpoint=_aws_sts(env, region),
        session_name=_session_name(env.get("AWS_ROLE_SESSION_NAME")),
        where="AWS_ROLE_ARN",
    )


def _from_profile(
    profile: Mapping[str, Any], where: str, dialect: str, env: Mapping[str, str], region: str
) -> Source | None:
    kinds = [
        k
        for k in ("access_key_id", "credential_process", "ecs_ram_role", "role_arn")
        if profile.get(k) not in (None, "", False)
    ]
    if not kinds and profile.get("access_key_secret"):
        raise UsageError(f"the {where} needs both access_key_id and access_key_secret")
    if len(kinds) > 1:
        raise UsageError(
            f"the {where} sets {' and '.join(kinds)}: choose one way to get credentials"
        )
    if not kinds:
        return None
    kind = kinds[0]
    if kind == "access_key_id":
        if not profile.get("access_key_secret"):
            raise UsageError(f"the {where} needs both access_key_id and access_key_secret")
        return Static(
            where,
            Credentials(
                str(profile["access_key_id"]),
                str(profile["access_key_secret"]),
                profile.get("session_token") or None,
            ),
        )
    if kind == "credential_process":
        command = str(profile["credential_process"])
        _split(command, where)
        return Process(command, where)
    if kind == "ecs_ram_role":
        if dialect != "oss":
            raise UsageError(
                f"the {where} sets ecs_ram_role, which is for oss:// (use the EC2 "
                "instance role for s3://)"
            )
        role = profile["ecs_ram_role"]
        return InstanceRole(
            flavor="ecs",
            endpoint=_metadata_endpoint(env, profile, "ecs"),
            role=None if role is True else str(role),
            require_token=_truthy(env, "ALIBABA_CLOUD_IMDSV1_DISABLED"),
        )
    # role_arn: an OIDC role (oss) or a web identity role (s3), with a token file.
    token_key = "oidc_token_file" if dialect == "oss" else "web_identity_token_file"
    token_file = profile.get(token_key)
    if not token_file:
        raise UsageError(f"the {where} sets role_arn but not {token_key}")
    if dialect == "oss":
        if not profile.get("oidc_provider_arn"):
            raise UsageError(f"the {where} sets role_arn but not oidc_provider_arn")
        return AssumeRoleWithToken(
            flavor="oidc",
            role_arn=str(profile["role_arn"]),
            provider_arn=str(profile["oidc_provider_arn"]),
            token_file=str(token_file),
            sts_endpoint=_alibaba_sts(
                profile.get("sts_endpoint") or env.get("ALIBABA_CLOUD_STS_ENDPOINT")
            ),
            session_name=_session_name(profile.get("role_session_name")),
            where=where,
        )
    sts = str(profile["sts_endpoint"]) if profile.get("sts_endpoint") else _aws_sts(env, region)
    return AssumeRoleWithToken(
        flavor="web_identity",
        role_arn=str(profile["role_arn"]),
        token_file=str(token_file),
        sts_endpoint=_url(sts),
        session_name=_session_name(profile.get("role_session_name")),
        where=where,
    )


def _aws_shared_files(env: Mapping[str, str], region: str) -> Source | None:
    """The AWS profile of ``~/.aws/credentials`` and ``~/.aws/config``."""
    name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    named = bool(env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE"))
    home = env.get("HOME") or os.path.expanduser("~")
    cred_path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path(home, ".aws", "credentials"))
    conf_path = Path(env.get("AWS_CONFIG_FILE") or Path(home, ".aws", "config"))
    section: dict[str, str] = {}
    found = []
    # The credentials file's sections are bare names; the config file's are
    # "profile NAME", except "default". Keys of the credentials file win.
    for path, title in (
        (conf_path, name if name == "default" else f"profile {name}"),
        (cred_path, name),
    ):
        parsed = _read_ini(path)
        if parsed is not None and parsed.has_section(title):
            section.update(parsed[title])
            found.append(str(path))
    if not found:
        if named:
            raise UsageError(f"AWS profile {name!r} not found in {cred_path} or {conf_path}")
        return None
    where = f"AWS profile {name!r} of {' and '.join(found)}"
    if section.get("aws_access_key_id") or section.get("aws_secret_access_key"):
        if not (section.get("aws_access_key_id") and section.get("aws_secret_access_key")):
            raise UsageError(f"the {where} needs both aws_access_key_id and aws_secret_access_key")
        return Static(
            where,
            Credentials(
                section["aws_access_key_id"],
                section["aws_secret_access_key"],
                section.get("aws_session_token") or None,
            ),
        )
    if section.get("credential_process"):
        _split(section["credential_process"], where)
        return Process(section["credential_process"], where)
    if section.get("role_arn") and section.get("web_identity_token_file"):
        return AssumeRoleWithToken(
            flavor="web_identity",
            role_arn=section["role_arn"],
            token_file=section["web_identity_token_file"],
            sts_endpoint=_aws_sts(env, region),
            session_name=_session_name(section.get("role_session_name")),
            where=where,
        )
    if section.get("role_arn"):
        raise UsageError(
            f"the {where} assumes a role with source_profile or "
            "credential_source, which ossfs does not do (give keys, "
            "credential_process or web_identity_token_file)"
        )
    if named:
        raise UsageError(f"the {where} has no credentials")
    return None


def _read_ini(path: Path) -> configparser.ConfigParser | None:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as e:
        raise UsageError(
            f"{path} is not a valid AWS config file: {str(e).splitlines()[0]}"
        ) from None
    return parser


def _ecs_role(
    env: Mapping[str, str], profile: Mapping[str, Any], fallback: str
) -> InstanceRole | None:
    if _truthy(env, "ALIBABA_CLOUD_ECS_METADATA_DISABLED"):
        return None
    role = env.get("ALIBABA_CLOUD_ECS_METADATA") or None
    return InstanceRole(
        flavor="ecs",
        endpoint=_metadata_endpoint(env, profile, "ecs"),
        role=role,
        require_token=_truthy(env, "ALIBABA_CLOUD_IMDSV1_DISABLED"),
        fallback=None if role else fallback,
    )


def _ec2_role(
    env: Mapping[str, str], profile: Mapping[str, Any], fallback: str
) -> InstanceRole | None:
    if _truthy(env, "AWS_EC2_METADATA_DISABLED"):
        return None
    return InstanceRole(
        flavor="ec2",
        endpoint=_metadata_endpoint(env, profile, "ec2"),
        require_token=_truthy(env, "AWS_EC2_METADATA_V1_DISABLED"),
        fallback=fallback,
    )


def _metadata_endpoint(env: Mapping[str, str], profile: Mapping[str, Any], flavor: str) -> str:
    if flavor == "ecs":
        given = profile.get("metadata_endpoint") or env.get("OSSFS_ECS_METADATA_ENDPOINT")
        return _url(str(given)) if given else ECS_METADATA
    given = profile.get("metadata_endpoint") or env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    return _url(str(given)) if given else EC2_METADATA


def _alibaba_sts(given: Any) -> str:
    # ALIBABA_CLOUD_STS_ENDPOINT is a host name (sts.cn-hangzhou.aliyuncs.com);
    # a URL is taken as it is.
    return _url(str(given)) if given else ALIBABA_STS


def _aws_sts(env: Mapping[str, str], region: str) -> str:
    given = env.get("AWS_ENDPOINT_URL_STS")
    return _url(given) if given else f"https://sts.{region}.amazonaws.com"


def _url(text: str) -> str:
    text = text.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    if not text.startswith(("http://", "https://")):
        raise UsageError(f"not an http(s) URL: {printable(text)!r}")
    return text


def _session_name(given: Any) -> str:
    # 2 to 64 characters of letters, digits, ".@-_" (both services).
    return str(given) if given else "ossfs"


def _split(command: str, where: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise UsageError(f"credential_process of the {where} cannot be parsed: {e}") from None
    if not argv:
        raise UsageError(f"credential_process of the {where} is empty")
    return argv


def _nothing_found(dialect: str, env: Mapping[str, str], profile_where: str) -> str:
    """What the chain looked for, for the message when the metadata service fails too."""
    if dialect == "oss":
        text = (
            "no credentials found (OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, "
            f"ALIBABA_CLOUD_ACCESS_KEY_ID, RRSA variables, the {profile_where})"
        )
        other = "AWS_ACCESS_KEY_ID"
    else:
        text = (
            "no credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"AWS_ROLE_ARN, the {profile_where}, the AWS profile files)"
        )
        other = "OSS_ACCESS_KEY_ID"
    if env.get(other):
        mine = "OSS_ACCESS_KEY_ID" if dialect == "oss" else "AWS_ACCESS_KEY_ID"
        text += f" ({other} is set, but {dialect}:// URLs and the {dialect} dialect use {mine})"
    return text


def no_credentials_message(dialect: str, env: Mapping[str, str], profile_where: str) -> str:
    return _nothing_found(dialect, env, profile_where) + "; use --anonymous for a public bucket"


# ------------------------------------------------------------------------- answers


def parse_time(text: Any, what: str) -> float:
    """An ISO 8601 / RFC 3339 time (``2026-11-30T05:20:01Z``) as seconds since the epoch."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a time")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{what} is not an ISO 8601 time: {printable(text[:40])!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _field(doc: Mapping[str, Any], name: str, what: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} has no {name}")
    return value


def _json_object(text: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    return doc


def _temporary(doc: Mapping[str, Any], what: str, secret: str, token: str) -> Issued:
    """Temporary credentials: ``AccessKeyId``, the secret and the token under the names
    this source gives them, and ``Expiration``; each one required."""
    return Issued(
        Credentials(
            _field(doc, "AccessKeyId", what), _field(doc, secret, what), _field(doc, token, what)
        ),
        parse_time(_field(doc, "Expiration", what), "Expiration"),
    )


def parse_process_output(text: bytes) -> Issued:
    """The JSON a credential process printed.

    Three shapes are accepted: AWS's (``Version`` 1, ``AccessKeyId``,
    ``SecretAccessKey``, ``SessionToken``, ``Expiration``), the Alibaba Cloud
    CLI's external mode (``mode`` AK or StsToken, ``access_key_id``,
    ``access_key_secret``, ``sts_token``, ``expiration``) and Alibaba Cloud's
    STS shape (``AccessKeyId``, ``AccessKeySecret``, ``SecurityToken``,
    ``Expiration``). Raises ValueError saying what is wrong (never a value).
    """
    what = "its output"
    doc = _json_object(text, what)
    if "access_key_id" in doc or "mode" in doc:
        mode = doc.get("mode", "AK")
        if mode not in ("AK", "StsToken"):
            raise ValueError(
                f"its output has mode {printable(str(mode)[:20])!r} (AK or StsToken expected)"
            )
        token = doc.get("sts_token") or None
        if mode == "StsToken" and not token:
            raise ValueError("its output has mode StsToken but no sts_token")
        expiration = doc.get("expiration")
        return Issued(
            Credentials(
                _field(doc, "access_key_id", what), _field(doc, "access_key_secret", what), token
            ),
            parse_time(expiration, "expiration") if expiration else None,
        )
    if "SecretAccessKey" in doc:
        if doc.get("Version") != 1:
            raise ValueError('its output needs "Version": 1')
        secret = _field(doc, "SecretAccessKey", what)
        token = doc.get("SessionToken") or None
    else:
        secret = _field(doc, "AccessKeySecret", what)
        token = doc.get("SecurityToken") or None
    expiration = doc.get("Expiration")
    return Issued(
        Credentials(_field(doc, "AccessKeyId", what), secret, token),
        parse_time(expiration, "Expiration") if expiration else None,
    )


def parse_metadata_credentials(text: bytes, flavor: Literal["ecs", "ec2"]) -> Issued:
    """A metadata service's role credentials (JSON with ``Code``: ``Success``)."""
    doc = _json_object(text, "the answer")
    code = doc.get("Code")
    if code != "Success":
        raise ValueError(f"the answer's Code is {printable(str(code)[:40])!r}")
    if flavor == "ecs":
        return _temporary(doc, "the answer", "AccessKeySecret", "SecurityToken")
    return _temporary(doc, "the answer", "SecretAccessKey", "Token")


def parse_oidc_answer(status: int, text: bytes) -> Issued:
    """Alibaba Cloud STS's JSON answer to AssumeRoleWithOIDC (or its error)."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise ValueError(f"STS answered {status} with something that is not JSON")
    if status != 200 or "Credentials" not in doc:
        code = printable(str(doc.get("Code", "?"))[:80])
        message = printable(str(doc.get("Message", ""))[:200])
        rid = printable(str(doc.get("RequestId", ""))[:80])
        raise ValueError(
            f"STS answered {status} {code}: {message}" + (f" (request id {rid})" if rid else "")
        )
    c = doc["Credentials"]
    if not isinstance(c, dict):
        raise ValueError("STS's answer has no Credentials")
    return _temporary(c, "STS's answer", "AccessKeySecret", "SecurityToken")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _find(elem: ET.Element, *path: str) -> ET.Element | None:
    for name in path:
        found = next((c for c in elem if _local(c.tag) == name), None)
        if found is None:
            return None
        elem = found
    return elem


def parse_web_identity_answer(status: int, text: bytes) -> Issued:
    """AWS STS's XML answer to AssumeRoleWithWebIdentity (or its ErrorResponse)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        raise ValueError(f"STS answered {status} with something that is not XML") from None
    if status != 200 or _local(root.tag) == "ErrorResponse":
        code = _find(root, "Error", "Code")
        message = _find(root, "Error", "Message")
        code_text = printable((code.text or "?")[:80]) if code is not None else "?"
        msg_text = printable((message.text or "")[:200]) if message is not None else ""
        raise ValueError(f"STS answered {status} {code_text}: {msg_text}")
    c = _find(root, "AssumeRoleWithWebIdentityResult", "Credentials")
    if c is None:
        raise ValueError("STS's answer has no Credentials")
    values = {_local(e.tag): (e.text or "").strip() for e in c}
    return _temporary(values, "STS's answer", "SecretAccessKey", "SessionToken")


def describe_failure(source: Source, reason: str) -> CredentialError:
    """The one line a user sees when *source* gives no credentials."""
    if isinstance(source, InstanceRole) and source.fallback:
        return CredentialError(
            f"{source.fallback}, and {source.name} gave none: {reason}; "
            "use --anonymous for a public bucket"
        )
    return CredentialError(f"cannot get credentials from {source.name}: {reason}")
