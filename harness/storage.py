"""Results storage: a local path, a shared filesystem path, or a URI (``s3://``, ``gs://``, ``file://``),
read and written through pyarrow filesystems, the same layer Ray Tune and Train use for their storage.

Writes never leave half a file: locally a temporary file is renamed over the target; object stores have no
rename, but a single upload replaces an object atomically, so there the bytes go up in one write.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import uuid

import pyarrow.fs as pafs

# What pyarrow's S3 filesystem (and so Ray's storage, which uses it) reads from the environment and a
# driver passes on to its workers: the endpoint of an S3-compatible server, the credentials, the region.
# Not the variables naming files (AWS_SHARED_CREDENTIALS_FILE, GOOGLE_APPLICATION_CREDENTIALS...): those
# files are on the driver's machine, not necessarily on the workers'.
OBJECT_STORE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def object_store_env() -> dict[str, str]:
    """This process's object-store settings (:data:`OBJECT_STORE_ENV` that are set): what a driver passes
    to the workers it starts, so they reach the same store."""
    return {name: os.environ[name] for name in OBJECT_STORE_ENV if name in os.environ}


def ray_init_env() -> dict[str, object]:
    """``ray.init`` options that give every worker the driver's :func:`object_store_env`, for a cluster
    started before those variables were set. Nothing inside a ``ray job submit`` job: the job's runtime
    env governs there (pass the variables with ``--runtime-env-json``), and Ray refuses one set twice."""
    env = object_store_env()
    if not env or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return {}
    return {"runtime_env": {"env_vars": env}}


class Location:
    """A folder on some filesystem. ``Location("results")``, ``Location("s3://bucket/moe-bench")``."""

    def __init__(self, location: str | os.PathLike) -> None:
        text = str(location)
        if "://" in text:
            self.fs, self.path = pafs.FileSystem.from_uri(text)
            self.uri = text.rstrip("/")
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(pathlib.Path(text).resolve())
            self.uri = self.path
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Location:
        child = Location.__new__(Location)
        child.fs, child.local = self.fs, self.local
        child.path = posixpath.join(self.path, name)
        child.uri = f"{self.uri}/{name}"
        return child

    def __str__(self) -> str:
        return self.uri

    @property
    def parent(self) -> Location:
        parent = Location.__new__(Location)
        parent.fs, parent.local = self.fs, self.local
        parent.path = posixpath.dirname(self.path)
        parent.uri = self.uri.rsplit("/", 1)[0]
        return parent

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def list_dirs(self) -> list[str]:
        """Names of the folders directly in this one, sorted (none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.Directory)

    def list_files(self) -> list[str]:
        """Names of the files directly in this folder, sorted (none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.File)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_empty_or_missing(self) -> bool:
        """No folder, or a folder without entries."""
        if not self.exists():
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically (see the module docstring)."""
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        tmp = posixpath.join(posixpath.dirname(self.path), f".{self.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def check_writable(self) -> None:
        """Raise ``OSError`` unless a file can be created in this folder: a probe file is written and
        removed, so a long run finds out before it starts, not when it saves. Local folders the probe had to
        create are removed again (only while empty), so a run refused later leaves nothing behind."""
        created = self._missing_local_folders()
        probe = self / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.fs.delete_file(probe.path)
        finally:
            for path in created:  # deepest first; rmdir refuses a folder another process has written into
                try:
                    os.rmdir(path)
                except OSError:
                    break

    def _missing_local_folders(self) -> list[str]:
        """This local folder and its missing ancestors, deepest first (empty for object stores, whose
        folders are implicit)."""
        missing: list[str] = []
        path = self.path
        while self.local and not os.path.exists(path) and path != posixpath.dirname(path):
            missing.append(path)
            path = posixpath.dirname(path)
        return missing


def remove_other_checkpoints(fs: pafs.FileSystem, kept: str) -> list[str]:
    """Delete the ``checkpoint_*`` folders beside the checkpoint folder ``kept`` (a path on ``fs``): Ray
    Tune and Train keep a trial's or run's checkpoints side by side in one folder. Returns the names
    deleted, sorted."""
    folder, name = posixpath.split(kept.rstrip("/"))
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        other = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and other.startswith("checkpoint_") and other != name:
            fs.delete_dir(info.path)
            removed.append(other)
    return sorted(removed)
