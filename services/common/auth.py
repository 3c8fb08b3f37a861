"""Bearer-token authentication and roles for loupe's gRPC servers (sync and asyncio).

Every call carries ``authorization: Bearer <token>`` metadata. A server holds an
``AuthPolicy``: the SHA-256 digests of the tokens it accepts, each with the roles it grants.
The method → role table (``METHOD_ROLES``) is declared once, here:

- ``read``: ``Retrieval/Search``, ``SearchBatch``, ``GetImages``, ``ListImages``, ``GetStats`` and server reflection (so that an
  anonymous caller cannot even list the services when auth is on);
- ``write`` (implies read): ``Retrieval/AddImages``, ``Delete``, ``FitWhitening``, ``BuildGraph``, ``Backup``,
  ``ListBackups``, ``Restore`` (a backup's url names where the broker writes and reads), ``Reshard``;
- ``internal``: every method of the internal ``Shard`` and ``Extractor`` services; only the
  broker holds the cluster-internal token;
- open: gRPC health checking (``Check``/``Watch``), for load balancers and Kubernetes probes.

A method that is not in the table is refused for everybody (deny by default).

Status codes: no token, a malformed header or a token the server does not know →
UNAUTHENTICATED; a known token without the method's role → PERMISSION_DENIED. The details are
fixed strings that say nothing about which tokens or roles exist. Token comparison is
constant-time: the presented token is hashed and compared with ``hmac.compare_digest`` against
*every* known digest (no early exit, equal lengths), so timing reveals neither a prefix nor
which token matched.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import grpc

READ, WRITE, INTERNAL = "read", "write", "internal"
OPEN = ""  # no token needed
TOKEN_ROLES = (READ, WRITE)  # roles a tokens file may name
IMPLIED: Mapping[str, frozenset[str]] = {READ: frozenset({READ}), WRITE: frozenset({READ, WRITE}), INTERNAL: frozenset({INTERNAL})}

_RETRIEVAL = "/loupe.v1.Retrieval/"
METHOD_ROLES: Mapping[str, str] = {
    _RETRIEVAL + "Search": READ,
    _RETRIEVAL + "GetStats": READ,
    _RETRIEVAL + "SearchBatch": READ,
    _RETRIEVAL + "GetImages": READ,
    _RETRIEVAL + "ListImages": READ,
    _RETRIEVAL + "AddImages": WRITE,
    _RETRIEVAL + "Delete": WRITE,
    _RETRIEVAL + "FitWhitening": WRITE,
    _RETRIEVAL + "BuildGraph": WRITE,
    _RETRIEVAL + "Backup": WRITE,
    _RETRIEVAL + "ListBackups": WRITE,
    _RETRIEVAL + "Restore": WRITE,
    _RETRIEVAL + "Reshard": WRITE,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": READ,
}
"""Role each public/common method needs; internal services are covered by ``INTERNAL_SERVICES``."""

INTERNAL_SERVICES = ("/loupe.v1.Shard/", "/loupe.v1.Extractor/")
DENIED = "__denied__"  # role of an unknown method: nobody holds it

UNAUTHENTICATED_DETAIL = "missing or invalid bearer token"
PERMISSION_DENIED_DETAIL = "token does not allow this method"
METADATA_KEY = "authorization"


def required_role(method: str) -> str:
    """The role a full method name (``/pkg.Service/Method``) needs; ``OPEN`` for none."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    if method.startswith(INTERNAL_SERVICES):
        return INTERNAL
    return DENIED


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class AuthPolicy:
    """Tokens a server accepts (as SHA-256 digests) and the roles each grants.

    Holds no plaintext token, so it can be pickled to Ray actors and logged safely.
    """

    grants: tuple[tuple[bytes, frozenset[str]], ...] = field(default=())

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, str]) -> "AuthPolicy":
        """Policy from ``{token: role}`` (role in read/write/internal; write implies read)."""
        grants = []
        for token, role in tokens.items():
            if role not in IMPLIED:
                raise ValueError(f"auth role: {role!r} is not one of {sorted(IMPLIED)}")
            if not token:
                raise ValueError("auth token: empty token")
            grants.append((_digest(token), IMPLIED[role]))
        return cls(tuple(grants))

    @classmethod
    def internal(cls, token: str) -> "AuthPolicy":
        """Policy of a shard/extractor server: only the cluster-internal token."""
        return cls.from_tokens({token: INTERNAL})

    def roles_of(self, token: str | None) -> frozenset[str] | None:
        """Roles granted to ``token``; None when it is missing or unknown. Constant-time."""
        presented = _digest(token or "")
        found: frozenset[str] | None = None
        for digest, roles in self.grants:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, digest):
                found = roles
        return found if token else None

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the (code, detail) to abort with."""
        role = required_role(method)
        if role == OPEN:
            return None
        roles = self.roles_of(bearer_token(metadata))
        if roles is None:
            return grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL
        if role not in roles:
            return grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_DETAIL
        return None


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((METADATA_KEY, f"Bearer {token}"),)


# --- token files ---------------------------------------------------------------------
def read_tokens_file(path: str) -> dict[str, str]:
    """Parse a tokens file: one ``ROLE TOKEN`` per non-empty, non-``#`` line.

    Returns ``{token: role}``. Raises ValueError naming the file and line on a bad role, a
    missing token or a token listed twice; the token itself is never put in a message.
    """
    tokens: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"auth_tokens_file {path}:{n}: expected 'ROLE TOKEN'")
            role, token = parts
            if role not in TOKEN_ROLES:
                raise ValueError(f"auth_tokens_file {path}:{n}: role must be one of {list(TOKEN_ROLES)}, got {role!r}")
            if token in tokens:
                raise ValueError(f"auth_tokens_file {path}:{n}: token listed twice")
            tokens[token] = role
    if not tokens:
        raise ValueError(f"auth_tokens_file {path}: no tokens")
    return tokens


def read_token_file(path: str, setting: str = "token_file") -> str:
    """A single token from a file (surrounding whitespace stripped); ValueError when empty."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token or len(token.split()) != 1:
        raise ValueError(f"{setting} {path}: expected one token")
    return token


def new_internal_token() -> str:
    """A fresh random cluster-internal token (256 bits)."""
    return secrets.token_urlsafe(32)


# --- server interceptors -------------------------------------------------------------
def _denial_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, detail: str, aio: bool) -> grpc.RpcMethodHandler:
    """A handler of the same arity as ``handler`` that aborts with (code, detail)."""
    if aio:
        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, detail)
    else:
        def deny(_request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
            context.abort(code, detail)
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class AuthInterceptor(grpc.ServerInterceptor):
    """Sync-server interceptor enforcing an ``AuthPolicy``."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        refused = self.policy.check(details.method, details.invocation_metadata)
        handler = continuation(details)
        if refused is None or handler is None:
            return handler
        return _denial_handler(handler, *refused, aio=False)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """Asyncio-server twin of ``AuthInterceptor`` (the broker)."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        refused = self.policy.check(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if refused is None or handler is None:
            return handler
        return _denial_handler(handler, *refused, aio=True)


# --- client side (the broker's channels to shards/extractors) ------------------------
class AioBearerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every unary call of an asyncio channel."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ()) + self._metadata))
        new = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)
        return await continuation(new, request)
