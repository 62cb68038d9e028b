"""Small fakes of the services credentials come from, on 127.0.0.1.

`FakeIdentity` is one HTTP server that plays, by path:

- the ECS instance metadata service (``/latest/api/token``,
  ``/latest/meta-data/ram/security-credentials/[ROLE]``), hardened mode
  included: with ``require_token`` a request without a valid
  ``X-aliyun-ecs-metadata-token`` is refused with 403;
- the EC2 instance metadata service, IMDSv2 (``X-aws-ec2-metadata-token``,
  ``/latest/meta-data/iam/security-credentials/[ROLE]``);
- Alibaba Cloud STS AssumeRoleWithOIDC (JSON) and AWS STS
  AssumeRoleWithWebIdentity (XML), as ``POST /`` with a form.

Every issue mints new credentials valid for ``lifetime`` seconds, records
them in ``issued`` and, when ``oss`` is set, registers them with that
`OssTestServer` (with their session token and expiration), so the object
server accepts exactly the credentials this fake gave out, until they expire.
``broken`` makes every answer a 500 (a provider that is down).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from ossfs.testing import OssTestServer

ROLE = "ossfs-test-role"


@dataclass
class Issue:
    access_key_id: str
    secret: str
    token: str
    expiration: float
    issued_at: float
    via: str


@dataclass
class FakeIdentity:
    lifetime: float = 3600.0
    oss: OssTestServer | None = None
    require_token: bool = False
    refuse_token: bool = False  # answer the token PUT with 404 (a service without the mode)
    broken: bool = False
    oidc_token: str = "oidc-token-from-the-cluster"
    issued: list[Issue] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                fake._record(self)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if fake.broken:
                    return self._send(500, b"down")
                if self.path != "/latest/api/token" or fake.refuse_token:
                    return self._send(404, b"not found")
                ttl = self.headers.get(
                    "X-aliyun-ecs-metadata-token-ttl-seconds"
                ) or self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if not ttl or not 1 <= int(ttl) <= 21600:
                    return self._send(400, b"bad ttl")
                token = f"md-token-{len(fake._tokens)}"
                fake._tokens.add(token)
                self._send(200, token.encode())

            def do_GET(self) -> None:
                fake._record(self)
                if fake.broken:
                    return self._send(500, b"down")
                token = self.headers.get("X-aliyun-ecs-metadata-token") or self.headers.get(
                    "X-aws-ec2-metadata-token"
                )
                if fake.require_token and token not in fake._tokens:
                    return self._send(403, b"token required")
                for prefix, flavor in (
                    ("/latest/meta-data/ram/security-credentials/", "ecs"),
                    ("/latest/meta-data/iam/security-credentials/", "ec2"),
                ):
                    if self.path.startswith(prefix):
                        role = self.path[len(prefix) :]
                        if not role:
                            return self._send(200, ROLE.encode())
                        if role != ROLE:
                            return self._send(404, b"no such role")
                        issue = fake._issue(flavor)
                        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issue.expiration))
                        if flavor == "ecs":
                            doc = {
                                "AccessKeyId": issue.access_key_id,
                                "AccessKeySecret": issue.secret,
                                "SecurityToken": issue.token,
                                "Expiration": when,
                                "LastUpdated": when,
                                "Code": "Success",
                            }
                        else:
                            doc = {
                                "Code": "Success",
                                "LastUpdated": when,
                                "Type": "AWS-HMAC",
                                "AccessKeyId": issue.access_key_id,
                                "SecretAccessKey": issue.secret,
                                "Token": issue.token,
                                "Expiration": when,
                            }
                        return self._send(200, json.dumps(doc).encode(), "application/json")
                self._send(404, b"not found")

            def do_POST(self) -> None:
                fake._record(self)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                fake.forms.append(form)
                action = form.get("Action")
                if fake.broken:
                    return self._send(500, b'{"Code":"InternalError","Message":"down"}')
                if action == "AssumeRoleWithOIDC":
                    if form.get("OIDCToken") != fake.oidc_token:
                        return self._send(
                            400,
                            json.dumps(
                                {
                                    "Code": "AuthenticationFail.OIDCToken.Invalid",
                                    "Message": "the OIDC token is invalid",
                                    "RequestId": "R-1",
                                }
                            ).encode(),
                            "application/json",
                        )
                    issue = fake._issue("oidc")
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issue.expiration))
                    return self._send(
                        200,
                        json.dumps(
                            {
                                "RequestId": "R-2",
                                "Credentials": {
                                    "AccessKeyId": issue.access_key_id,
                                    "AccessKeySecret": issue.secret,
                                    "SecurityToken": issue.token,
                                    "Expiration": when,
                                },
                            }
                        ).encode(),
                        "application/json",
                    )
                if action == "AssumeRoleWithWebIdentity":
                    if form.get("WebIdentityToken") != fake.oidc_token:
                        return self._send(
                            400,
                            (
                                b"<ErrorResponse><Error><Type>Sender</Type>"
                                b"<Code>InvalidIdentityToken</Code><Message>bad token</Message>"
                                b"</Error><RequestId>r</RequestId></ErrorResponse>"
                            ),
                            "text/xml",
                        )
                    issue = fake._issue("web_identity")
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issue.expiration))
                    return self._send(
                        200,
                        (
                            "<AssumeRoleWithWebIdentityResponse "
                            'xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                            "<AssumeRoleWithWebIdentityResult><Credentials>"
                            f"<SessionToken>{issue.token}</SessionToken>"
                            f"<SecretAccessKey>{issue.secret}</SecretAccessKey>"
                            f"<Expiration>{when}</Expiration>"
                            f"<AccessKeyId>{issue.access_key_id}</AccessKeyId>"
                            "</Credentials></AssumeRoleWithWebIdentityResult>"
                            "<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>"
                            "</AssumeRoleWithWebIdentityResponse>"
                        ).encode(),
                        "text/xml",
                    )
                self._send(400, b'{"Code":"InvalidAction"}', "application/json")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeIdentity:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers)))

    def _issue(self, via: str) -> Issue:
        with self._lock:
            n = len(self.issued)
            now = time.time()
            # Whole seconds, as the services write them; never less than `lifetime`.
            expiration = float(int(now + self.lifetime) + 1)
            issue = Issue(
                f"STS.key{n}",
                f"secret-{n}-do-not-print",
                f"token-{n}-do-not-print",
                expiration,
                now,
                via,
            )
            self.issued.append(issue)
        if self.oss is not None:
            self.oss.add_key(
                issue.access_key_id, issue.secret, issue.token, expires=issue.expiration
            )
        return issue
