"""Where backups live: a directory on the broker's machine or an S3 bucket (``s3://bucket/prefix``).

Both keep flat object names (``chunks/<sha256>``, ``backups/<id>/manifest.json``) under a root;
the S3 store speaks the S3 HTTP protocol through boto3, which takes its endpoint and credentials
from the usual environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, an
instance or pod role). Every method is blocking: callers on an event loop run them in a thread.

Errors are loupe's domain errors: a missing object → ``MissingObject`` (the restore turns it into
DATA_LOSS naming the file), an unreachable store → ``Unavailable``, refused credentials or a
missing bucket → ``FailedPrecondition``, a malformed URL → ``InvalidArgument`` naming ``url``.
"""

from __future__ import annotations

import os
from typing import Protocol
from urllib.parse import urlparse

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable

MAX_URL_BYTES = 4096


class MissingObject(Exception):
    """The named object does not exist in the store."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class BackupStorage(Protocol):
    """Objects (bytes by name) under one root."""

    url: str

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name`` (whole or not at all: a reader never sees a partial object)."""
        ...

    def get(self, name: str) -> bytes:
        """The bytes of ``name``; ``MissingObject`` when there is none."""
        ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Names that start with ``prefix``, sorted."""
        ...


class DirectoryStorage:
    """Objects as files under a directory; written to a temporary name, fsynced, then renamed."""

    def __init__(self, root: str, url: str = "") -> None:
        self.root = root
        self.url = url or root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise FailedPrecondition(f"url: cannot write {path}: {exc.strerror or exc}") from None

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise MissingObject(name) from None
        except OSError as exc:
            raise FailedPrecondition(f"url: cannot read {self._path(name)}: {exc.strerror or exc}") from None

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def list(self, prefix: str) -> list[str]:
        out = []
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""  # walk only below the prefix's folder (not chunks/)
        for dirpath, _dirs, files in os.walk(self._path(base) if base else self.root):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                if ".tmp-" in f:
                    continue
                name = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)


class S3Storage:
    """Objects in an S3 bucket under a key prefix (boto3; endpoint and credentials from the
    environment, see the module docstring). A PUT is atomic in S3: a reader never sees half."""

    def __init__(self, bucket: str, prefix: str, url: str) -> None:
        import boto3  # a backup dependency: imported when an s3:// URL is used
        from botocore.config import Config

        self.bucket, self.prefix, self.url = bucket, prefix.strip("/"), url
        self._client = boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, fn):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MissingObject(name) from None
            if code == "NoSuchBucket":
                raise FailedPrecondition(f"url: bucket {self.bucket!r} does not exist ({self.url})") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise FailedPrecondition(f"url: S3 refused to {what} {self._key(name)!r} in {self.bucket!r}: {code}") from None
            raise Unavailable(f"url: S3 {what} of {self._key(name)!r} failed: {code or exc}") from None
        except NoCredentialsError:
            raise FailedPrecondition("url: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile/role)") from None
        except EndpointConnectionError as exc:
            raise Unavailable(f"url: S3 endpoint unreachable: {exc}") from None
        except BotoCoreError as exc:
            raise Unavailable(f"url: S3 {what} of {self._key(name)!r} failed: {exc}") from None

    def put(self, name: str, data: bytes) -> None:
        self._call("write", name, lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def get(self, name: str) -> bytes:
        return self._call("read", name, lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read())

    def exists(self, name: str) -> bool:
        try:
            self._call("look up", name, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(name)))
            return True
        except MissingObject:
            return False

    def list(self, prefix: str) -> list[str]:
        start = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages() -> list[str]:
            names = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                names.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return names

        return sorted(self._call("list", prefix, pages))


def open_storage(url: str) -> BackupStorage:
    """The store a backup URL names: an absolute directory path (or ``file:///path``), or
    ``s3://bucket[/prefix]``. ``InvalidArgument`` naming ``url`` otherwise."""
    if not url:
        raise InvalidArgument("url: required (an absolute directory path or s3://bucket/prefix)")
    if len(url.encode("utf-8")) > MAX_URL_BYTES:
        raise InvalidArgument(f"url: {len(url.encode('utf-8'))} bytes, the limit is {MAX_URL_BYTES}")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(f"url: {url!r} names no bucket (s3://bucket/prefix)")
        return S3Storage(parsed.netloc, parsed.path, url)
    if parsed.scheme == "file":
        path = parsed.path
    elif parsed.scheme == "":
        path = url
    else:
        raise InvalidArgument(f"url: scheme {parsed.scheme!r} is not supported (an absolute directory path, file:///path or s3://bucket/prefix)")
    if not os.path.isabs(path):
        raise InvalidArgument(f"url: {url!r} is a relative path; the broker needs an absolute directory path (the CLI makes it absolute)")
    return DirectoryStorage(os.path.normpath(path), url)
