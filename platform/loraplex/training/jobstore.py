"""Where a fine-tuning job keeps what outlives one run: a local folder or ``s3://``.

Owns: :class:`JobStore`, ``ray.storage_path`` opened as the pyarrow filesystem Ray Train
writes its checkpoints to (a local folder, or S3 and S3-compatible storage: AWS S3,
MinIO, Ceph, GCS's S3 interface; the endpoint and credentials come from the standard
``AWS_*`` environment variables), and on it: reading and atomically writing the job's
small files (``job.json``, the workers' pid and node files), copying the finished
adapter in and out whole, a write check that fails with one line naming the storage
before anything expensive starts, and the job's lock. The lock is ``flock`` on a local
folder; on S3 it is a lock object taken with a conditional write (``If-None-Match``),
renewed while the run lasts and taken over only once its lease has expired, so a holder
that died does not block the job for ever. Does not own: what the files say (``state``)
or training (``job``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex.errors import InputError, first_line
from loraplex.folders import replace_folder, staging_folder

log = logging.getLogger(__name__)

LEASE_S = 90.0  # an S3 lock nobody renewed for this long belongs to a dead run


class JobStore:
    """``ray.storage_path`` (a folder or ``s3://bucket/prefix``) as one filesystem."""

    def __init__(self, where: str | Path, endpoint: str | None = None) -> None:
        """``endpoint``: an S3-compatible server's URL; default ``AWS_ENDPOINT_URL_S3`` or
        ``AWS_ENDPOINT_URL``, else AWS itself. Credentials are never carried: each node
        has its own (environment, pod identity), as Ray Train's own storage expects."""
        import pyarrow.fs as pafs

        text = str(where).strip()
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme and scheme != "s3":
            raise InputError(
                f"ray.storage_path {text[:120]!r}: fine-tuning keeps its job state on a "
                "folder every node mounts or on s3:// storage (S3 or S3-compatible), not "
                f"on {scheme}://"
            )
        self.remote = bool(scheme)
        self.endpoint: str | None = None
        if not scheme:
            path = Path(text).expanduser().absolute()
            self.fs, self.root, self.uri = pafs.LocalFileSystem(), str(path), str(path)
            return
        self.root = text[5:].strip("/")
        if not self.root:
            raise InputError(f"ray.storage_path {text!r} names no bucket")
        self.uri = f"s3://{self.root}"
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.endpoint = endpoint or env or None
        try:
            if self.endpoint:
                self.fs = pafs.S3FileSystem(endpoint_override=self.endpoint)
            else:  # AWS: pyarrow finds the bucket's region
                self.fs = pafs.FileSystem.from_uri(self.uri)[0]
        except (OSError, ValueError) as e:
            raise InputError(f"ray.storage_path {text!r}: {first_line(e)}") from None

    def __repr__(self) -> str:
        return f"JobStore({self.uri!r})"

    # -- where things are ---------------------------------------------------------

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def location(self, rel: str) -> str:
        """What a user is told: a path, or an ``s3://`` URI."""
        return f"{self.uri}/{rel}".rstrip("/")

    def for_ray(self, rel: str) -> dict[str, Any]:
        """``RunConfig`` arguments that put Ray Train's checkpoints at ``rel``: on S3 the
        filesystem itself travels to the workers (its endpoint, not its credentials)."""
        if not self.remote:
            return {"storage_path": self._path(rel)}
        return {"storage_path": self._path(rel), "storage_filesystem": self.fs}

    def local_path(self, rel: str) -> Path:
        """The local folder of ``rel`` (local storage only)."""
        assert not self.remote, self
        return Path(self._path(rel))

    # -- small files ----------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None where there is none."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """Readers see the old text or the new, never part of it (a rename on a local
        folder; an S3 object becomes visible whole when its upload completes)."""
        if not self.remote:
            path = self.local_path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(text.encode())

    def files(self, rel: str, suffix: str = "") -> list[str]:
        """The names of the files directly under ``rel`` ending in ``suffix``."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return sorted(
            Path(i.path).name
            for i in found
            if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    # -- folders ----------------------------------------------------------------------

    def put_folder(self, local: Path, rel: str) -> None:
        """Copy a local folder to ``rel``, replacing what was there. Locally the new
        folder is complete before it takes the old one's place; on S3 the caller
        records that the copy finished (``state.mark_trained``) only after it did."""
        import pyarrow.fs as pafs

        if not self.remote:
            target = self.local_path(rel)
            staging = staging_folder(target)
            shutil.copytree(local, staging, dirs_exist_ok=True)
            replace_folder(staging, target)
            return
        self.fs.delete_dir_contents(self._path(rel), missing_dir_ok=True)
        pafs.copy_files(str(local), self._path(rel), destination_filesystem=self.fs)

    @contextlib.contextmanager
    def folder(self, rel: str) -> Iterator[Path]:
        """``rel`` as a local folder for the duration (downloaded from S3)."""
        if not self.remote:
            yield self.local_path(rel)
            return
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="loraplex-store-") as tmp:
            pafs.copy_files(self._path(rel), tmp, source_filesystem=self.fs)
            yield Path(tmp)

    # -- before anything expensive ---------------------------------------------------

    def check_writable(self) -> None:
        """Write and remove a small file at the top: a storage that refuses writes
        (missing bucket, no credentials, read-only folder, unreachable endpoint) is one
        line naming it, before data is read or Ray starts."""
        probe = f".loraplex-write-check-{os.getpid()}"
        try:
            self.write_text(probe, "ok")
            self.fs.delete_file(self._path(probe))
        except Exception as e:  # pyarrow raises OSError subclasses; a local path, too
            raise InputError(
                f"ray.storage_path {self.uri!r} cannot be written ({_reason(e)}); fine-tuning "
                "keeps its job state and checkpoints there"
            ) from None

    # -- one run of a job at a time ---------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the job's lock for the whole run: a second ``loraplex train`` of the
        same job (same storage) is refused with the holder named."""
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        if self.remote:
            with _S3Lease(self._path(f"{name}/job.lock"), holder, name, self.endpoint):
                yield
            return
        path = self.local_path(f"{name}/job.lock")
        created = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise _running(name, f.read().strip()) from None
            f.seek(0)
            f.truncate()
            f.write(holder)
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                if created and [p.name for p in path.parent.iterdir()] == [path.name]:
                    # refused before anything was written: leave no empty job behind
                    path.unlink()
                    path.parent.rmdir()
                fcntl.flock(f, fcntl.LOCK_UN)


def _running(name: str, holder: str) -> InputError:
    return InputError(
        f"job {name!r} is already running ({holder or 'another process'}); wait for it, or "
        "stop it first"
    )


def _reason(e: BaseException) -> str:
    # pyarrow: "... AWS Error NO_SUCH_BUCKET during X operation: text (Request ID: ...)"
    if m := re.search(r"AWS Error (\w+) during \w+ operation: ([^(]*)", str(e)):
        return f"{m[1]}: {m[2].strip()}"
    code, text = _code(e), first_line(e, 200)
    return f"{code}: {text}" if code and code not in text else text


class _S3Lease:
    """A lock object at ``bucket/key``: created only where none is (``If-None-Match``),
    renewed every third of the lease while held, replaced only once expired and only
    if it is still the expired one (``If-Match``), deleted on release."""

    def __init__(self, path: str, holder: str, name: str, endpoint: str | None) -> None:
        import boto3

        self.bucket, _, self.key = path.partition("/")
        self.holder, self.name = holder, name
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.etag = ""
        self.stop = threading.Event()
        self.renewer = threading.Thread(target=self._renew, daemon=True, name="job-lock-lease")

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + LEASE_S}).encode()

    def _put(self, **condition: str) -> str:
        r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)
        return str(r["ETag"])

    def __enter__(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{self.key}"
        try:
            try:
                self.etag = self._put(IfNoneMatch="*")
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                held = self.client.get_object(Bucket=self.bucket, Key=self.key)
                lease: dict[str, Any] = json.loads(held["Body"].read() or b"{}")
                if float(lease.get("expires", 0)) > time.time():
                    raise _running(self.name, str(lease.get("holder", ""))) from None
                log.warning("taking over the expired lock %s (%s)", where, lease.get("holder"))
                try:
                    self.etag = self._put(IfMatch=str(held["ETag"]))
                except ClientError as again:
                    if _code(again) in ("PreconditionFailed", "ConditionalRequestConflict"):
                        raise _running(self.name, "another process took it just now") from None
                    raise
        except (ClientError, BotoCoreError) as e:
            raise InputError(
                f"ray.storage_path s3://{self.bucket}: cannot take the job's lock {where} "
                f"({_reason(e)})"
            ) from None
        self.renewer.start()

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_S / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:  # the run goes on; a second run may now start beside it
                log.warning(
                    "could not renew the job's lock s3://%s/%s: %s", self.bucket, self.key, e
                )

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.renewer.join(timeout=30)
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _code(e: Any) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
