"""Object stores: one interface with compare-and-swap writes, over a local directory or an S3 bucket.

Keys are relative '/'-separated paths; etags are the quoted MD5 of the content on both stores, as on S3."""

from __future__ import annotations

import abc
import fcntl
import hashlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

MAX_KEY_BYTES = 1024  # S3's limit, enforced on both stores so that a key valid on one is valid on the other


class StorageError(Exception):
    """The storage layer's error: every failure of an object store or of the job queue is one of these."""


class NotFound(StorageError):
    """The key (or job) does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the key exists (put_if_absent) or changed since it was read (put_if_match)."""


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes and the etag that put_if_match compares against."""

    data: bytes
    etag: str


def check_key(key: str) -> str:
    """Return `key` if it is a valid object key; raise ValueError saying what a key may be otherwise."""
    segments = key.split("/")
    if (
        not key
        or len(key.encode()) > MAX_KEY_BYTES
        or any(not s or s.startswith(".") for s in segments)
        or any(c in key for c in "\\\0\r\n")
    ):
        raise ValueError(
            f"invalid key {key!r}: keys are relative '/'-separated paths of at most {MAX_KEY_BYTES} bytes whose "
            "segments are non-empty and do not start with '.' (no '..', no leading or trailing '/', no '\\')"
        )
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix is '' or the start of a valid key ('jobs/', 'q/al')."""
    if prefix:
        check_key(prefix + "x")
    return prefix


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


class ObjectStore(abc.ABC):
    """Get, put, compare-and-swap, delete and list objects by key."""

    @abc.abstractmethod
    def get(self, key: str) -> StoredObject:
        """The object's bytes and etag; raises NotFound."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Write unconditionally; returns the new etag."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Create the key; raises PreconditionFailed if it exists."""

    @abc.abstractmethod
    def put_if_match(self, key: str, data: bytes, etag: str, content_type: str | None = None) -> str:
        """Replace the object only if its etag is still `etag`; raises PreconditionFailed, or NotFound if gone."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key; deleting a missing key is not an error."""

    @abc.abstractmethod
    def delete_if_match(self, key: str, etag: str) -> None:
        """Remove the key only if its etag is still `etag`; raises PreconditionFailed, or NotFound if gone. (On an S3
        endpoint without conditional deletes the condition is not checked.)"""

    @abc.abstractmethod
    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        """Keys starting with `prefix`, in ascending (UTF-8 byte) order, after `start_after`, at most `limit`."""

    @abc.abstractmethod
    def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL that reads the object without credentials: presigned on S3, file:// locally."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key exists."""


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`: atomic writes (temp file + os.replace), serialised per key by flock on a
    striped lock file, so compare-and-swap holds across processes. A key cannot be another key's directory.
    What the file system refuses (permission denied, disk full, read-only) is raised as StorageError."""

    _META = ".objectstore"  # lock and temp files; never a key, since key segments cannot start with '.'

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._locks = self.root / self._META / "locks"
        self._tmp = self.root / self._META / "tmp"
        try:
            self._locks.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot use {self.root} as an object store: {e}") from e

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _os_errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise StorageError(f"cannot {action} {key!r} under {self.root}: {e}") from e

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        stripe = hashlib.blake2b(key.encode(), digest_size=1).hexdigest()  # one of 256 lock files
        with self._os_errors("lock", key):
            fd = os.open(self._locks / f"{stripe}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with self._os_errors("lock", key):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _current_etag(self, key: str, path: Path) -> str | None:
        try:
            return _etag(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"cannot read {key!r} under {self.root}: {e}") from e

    def _replace(self, key: str, path: Path, data: bytes) -> str:
        with self._os_errors("write", key):
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(10):  # a concurrent delete may prune the parent between mkdir and replace
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, path)
                    return _etag(data)
                except FileNotFoundError:
                    continue
            raise StorageError(f"cannot write {key!r}: its directory keeps disappearing")
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
            raise StorageError(
                f"cannot write {key!r}: a key cannot also be a directory of other keys ({e})"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot write {key!r} under {self.root}: {e}") from e
        finally:
            # Gone after os.replace; otherwise best effort: the error above is the one to report.
            with suppress(OSError):
                os.unlink(tmp)

    def get(self, key: str) -> StoredObject:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise StorageError(f"cannot read {key!r} under {self.root}: {e}") from e
        return StoredObject(data, _etag(data))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        with self._locked(key):
            return self._replace(key, path, data)

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        with self._locked(key):
            if self._current_etag(key, path) is not None:
                raise PreconditionFailed(f"{key!r} already exists")
            return self._replace(key, path, data)

    def put_if_match(self, key: str, data: bytes, etag: str, content_type: str | None = None) -> str:
        path = self._path(key)
        with self._locked(key):
            current = self._current_etag(key, path)
            if current is None:
                raise NotFound(f"no object {key!r} in {self.root}")
            if current != etag:
                raise PreconditionFailed(f"{key!r} changed: etag {current} is not {etag}")
            return self._replace(key, path, data)

    def delete(self, key: str) -> None:
        self._delete(key, etag=None)

    def delete_if_match(self, key: str, etag: str) -> None:
        self._delete(key, etag)

    def _delete(self, key: str, etag: str | None) -> None:
        path = self._path(key)
        with self._locked(key):
            if etag is not None:
                current = self._current_etag(key, path)
                if current is None:
                    raise NotFound(f"no object {key!r} in {self.root}")
                if current != etag:
                    raise PreconditionFailed(f"{key!r} changed: etag {current} is not {etag}")
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            except OSError as e:
                raise StorageError(f"cannot delete {key!r} under {self.root}: {e}") from e
        for parent in path.parents:  # prune empty directories so that listings stay short
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        _check_prefix(prefix)
        folder, _, name_prefix = prefix.rpartition("/")
        base = f"{folder}/" if folder else ""
        keys = self._walk(self.root / folder, base, name_prefix, start_after)
        with self._os_errors("list", prefix):
            for count, key in enumerate(keys):
                if limit is not None and count >= limit:
                    return
                yield key

    def _walk(self, directory: Path, base: str, name_prefix: str, start_after: str | None) -> Iterator[str]:
        """Keys under `directory` in S3 order: a directory sorts as its name plus '/'."""
        try:
            entries = [
                e for e in os.scandir(directory) if e.name.startswith(name_prefix) and e.name[0] != "."
            ]
        except (FileNotFoundError, NotADirectoryError):
            return
        items = sorted((e.name + "/" if e.is_dir(follow_symlinks=False) else e.name) for e in entries)
        for item in items:
            key = base + item
            if not item.endswith("/"):
                if start_after is None or key > start_after:
                    yield key
            elif start_after is None or key > start_after or start_after.startswith(key):
                yield from self._walk(directory / item[:-1], key, "", start_after)

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with self._os_errors("look up", key):
            return path.is_file()


class S3ObjectStore(ObjectStore):
    """Objects in `bucket` under `prefix` through boto3, endpoint from the standard AWS config (AWS_ENDPOINT_URL).
    `requests` counts the HTTP requests it sent, retries included, per S3 operation: {"PutObject": 3, ...}."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None, *, page_size: int = 1000) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket name")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{check_key(prefix)}/" if prefix else ""
        self.page_size = page_size
        self.client = client or boto3.client(
            "s3",
            config=Config(
                retries={"mode": "standard", "max_attempts": 8},
                max_pool_connections=32,
                signature_version="s3v4",  # presigned URLs: botocore may default to SigV2, which S3 is retiring
            ),
        )
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._in_call = threading.local()  # count only requests made by this store, even on a shared client
        self.client.meta.events.register("before-send.s3", self._count_request)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.bucket!r}, {self.prefix!r})"

    def _count_request(self, event_name: str, **_: Any) -> None:
        if getattr(self._in_call, "active", False):
            with self._count_lock:
                self.requests[event_name.rsplit(".", 1)[-1]] += 1

    def _call(self, operation: str, key: str, **params: Any) -> dict[str, Any]:
        self._in_call.active = True
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **params)
        except ClientError as e:
            raise self._error(e, key) from e
        except BotoCoreError as e:
            raise StorageError(
                f"S3 {operation} of {key!r} in s3://{self.bucket}/{self.prefix} failed: {e}"
            ) from e
        finally:
            self._in_call.active = False

    def _error(self, e: ClientError, key: str) -> StorageError:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"no object {where}")
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return PreconditionFailed(f"conditional write of {where} lost ({code})")
        return StorageError(f"S3 request for {where} failed: {e}")

    def _put(self, key: str, data: bytes, content_type: str | None, **condition: str) -> str:
        params: dict[str, Any] = {"Key": self.prefix + check_key(key), "Body": data, **condition}
        if content_type:
            params["ContentType"] = content_type
        try:
            return self._call("put_object", key, **params)["ETag"]
        except PreconditionFailed as e:
            # After a retry, the 412 may answer an earlier attempt of ours that succeeded but lost its response:
            # if the stored bytes are ours, the write happened.
            cause = e.__cause__
            if (
                condition
                and isinstance(cause, ClientError)
                and cause.response["ResponseMetadata"].get("RetryAttempts")
            ):
                try:
                    current = self.get(key)
                except NotFound:
                    raise e from cause
                if current.data == data:
                    return current.etag
            raise

    def get(self, key: str) -> StoredObject:
        response = self._call("get_object", key, Key=self.prefix + check_key(key))
        try:
            return StoredObject(response["Body"].read(), response["ETag"])
        except BotoCoreError as e:
            raise StorageError(f"reading s3://{self.bucket}/{self.prefix}{key} failed: {e}") from e

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self._put(key, data, content_type)

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self._put(key, data, content_type, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, etag: str, content_type: str | None = None) -> str:
        return self._put(key, data, content_type, IfMatch=etag)

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self.prefix + check_key(key))

    def delete_if_match(self, key: str, etag: str) -> None:
        self._call("delete_object", key, Key=self.prefix + check_key(key), IfMatch=etag)

    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        params: dict[str, Any] = {"Prefix": self.prefix + _check_prefix(prefix)}
        if start_after is not None:
            params["StartAfter"] = self.prefix + start_after
        remaining = limit
        while remaining is None or remaining > 0:
            params["MaxKeys"] = self.page_size if remaining is None else min(self.page_size, remaining)
            page = self._call("list_objects_v2", prefix, **params)
            keys = [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
            yield from keys
            if remaining is not None:
                remaining -= len(keys)
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    def url(self, key: str, expires_s: int = 3600) -> str:
        params = {"Bucket": self.bucket, "Key": self.prefix + check_key(key)}
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Key=self.prefix + check_key(key))
        except NotFound:
            return False
        return True


def open_store(url: str | os.PathLike[str]) -> ObjectStore:
    """A store from a URL: a directory path or file:///path -> LocalObjectStore, s3://bucket/prefix -> S3."""
    text = os.fspath(url)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise ValueError(f"invalid store URL {text!r}: expected s3://bucket or s3://bucket/prefix")
        return S3ObjectStore(parsed.netloc, parsed.path)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"invalid store URL {text!r}: a file URL names a local path, file:///path")
        return LocalObjectStore(unquote(parsed.path))
    if "://" in text:
        raise ValueError(
            f"unsupported store URL {text!r}: use a directory path, file:///path or s3://bucket/prefix"
        )
    return LocalObjectStore(text)
