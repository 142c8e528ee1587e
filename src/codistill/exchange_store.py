"""Where the storage exchange keeps its files: a local or shared path, or object storage by URL.

`codistill.exchange_dir` is a path (`/shared/run1`, as before) or an fsspec URL (`s3://bucket/prefix`
through s3fs; other fsspec filesystems where they behave the same). Credentials and endpoints come
only from the environment (for S3: the AWS_* variables, `AWS_ENDPOINT_URL` for a non-AWS server) and
are never logged. A `Store` offers what the exchange needs and nothing more: whole-object put (atomic:
a local file is written to a temporary name, fsynced and renamed; an object store's PUT is atomic
already), get, create-if-absent, list and delete.

Before anything is created (pre-launch): `check_exchange_dir` gives one line for an unknown scheme, a
missing bucket or refused credentials; preflight.check_path checks a local path like every other
directory setting, and refuses a path that looks like a URL with a slash missing (`half_url`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import UserError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HALF_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/*")  # "s3:bucket", "s3:/bucket": a URL missing its //


class StoreError(UserError):
    """The exchange storage refuses us (missing bucket, credentials, permissions)."""


def is_url(location: str) -> bool:
    return bool(URL.match(str(location)))


def _filesystem(location: str):
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    location = str(location)
    if not is_url(location):
        return LocalFileSystem(), str(Path(location).expanduser().absolute())
    scheme = URL.match(location).group(1)
    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:  # unknown protocol, or its package is missing
        raise StoreError(f"codistill.exchange_dir {location}: cannot open {scheme}:// storage "
                         f"({str(e).splitlines()[0][:160]})") from None
    return fs, path.rstrip("/")


def describe_failure(location: str, e: Exception) -> str:
    """One line for a storage failure; never includes credentials (botocore's messages do not)."""
    text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    lowered = text.lower()
    if "bucket does not exist" in lowered or "nosuchbucket" in lowered:
        return f"codistill.exchange_dir {location}: the bucket does not exist ({text})"
    if isinstance(e, PermissionError) or any(w in lowered for w in ("access denied", "accessdenied", "forbidden",
                                                                     "invalidaccesskeyid", "signature")):
        return (f"codistill.exchange_dir {location}: access refused ({text}); credentials are read from the "
                "environment (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if "credentials" in lowered:
        return (f"codistill.exchange_dir {location}: no credentials found ({text}); set them in the environment "
                "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return f"codistill.exchange_dir {location}: {text}"


def check_exchange_dir(location: str) -> None:
    """Pre-launch, for a URL: the scheme is known, the bucket exists and our credentials may list it.
    Creates nothing. A local path (and a URL missing its '//') is preflight.check_path's: the same
    walk as every other directory setting, one set of messages."""
    if not is_url(location):
        return
    fs, path = _filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)  # the bucket (or root) exists and our credentials may list it
    except Exception as e:  # noqa: BLE001 - every failure here is the user's storage or credentials
        raise StoreError(describe_failure(location, e)) from None


def half_url(location: str) -> str | None:
    """The scheme of a URL missing its '//' (`s3:bucket`, `s3:/bucket`), which a plain path join
    would turn into a local directory named `s3:`; None for a URL or a path (a drive letter too)."""
    half = None if is_url(location) else HALF_URL.match(location)
    return half.group(1) if half and len(half.group(1)) > 1 else None


class Store:
    """The exchange's files under one location (path or URL); names are relative, '/'-separated."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.fs, self.root = _filesystem(self.location)
        self.local = not is_url(self.location)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def existed(self) -> bool:
        """Whether anything is already there (False for a mistyped location nobody else uses)."""
        try:
            return bool(self.fs.exists(self.root) and self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return False

    def put(self, name: str, data: bytes) -> None:
        """Write the whole object atomically: readers see the old object, or none, or all of the new one."""
        if self.local:
            _atomic_local_write(Path(self.path(name)), data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it did (another job was first)."""
        if self.local:
            path = Path(self.path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _write_temp(path, data)
            try:
                os.link(tmp, path)  # atomic and exclusive: fails if `path` exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(self.path(name), data, IfNoneMatch="*")  # S3 conditional write
            return True
        except FileExistsError:
            return False

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None if it does not exist (not yet, or removed meanwhile)."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        """Names (relative to the root) of the objects directly under `prefix`."""
        if not self.local:
            self.fs.invalidate_cache(self.path(prefix))  # s3fs caches listings
        try:
            paths = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(p[len(self.root) + 1:] for p in (str(p) for p in paths))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass


def _write_temp(path: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_write_temp(path, data), path)
