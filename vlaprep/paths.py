"""Paths read from manifests, pointers and configs stay inside their directory (no traversal), and
files appear atomically (temp file in the same directory + fsync + rename + fsync of the directory)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid

_SEPARATORS = re.compile(r"[\\/]")


def confined(root: str, relative: str, where: str) -> str:
    """``root/relative``; raises ValueError for absolute paths, URLs, ``..`` parts or empty names.

    A manifest or pointer is data: an edited or crafted one must not make a reader open files outside
    the output directory it describes.
    """
    parts = _SEPARATORS.split(relative) if isinstance(relative, str) else None
    if (
        not parts
        or os.path.isabs(relative)
        or "://" in relative
        or re.match(r"^[A-Za-z]:", relative)
        or any(p in ("", "..") for p in parts)
    ):
        raise ValueError(
            f"expected a relative path inside {root!r}, got {relative!r} in {where}; "
            "hint: the file was edited or crafted, regenerate it"
        )
    return os.path.join(root, *parts) if "://" not in root else root.rstrip("/") + "/" + "/".join(parts)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the complete new one, never a partial write (local or object store)."""
    try:
        with open_write_atomic(path) as f:
            f.write(data)
    except OSError as e:  # ENOSPC/EDQUOT from write/fsync carry no file name: name the target
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from e
        raise


# --------------------------------------------------------------------------------------------------
# Local paths and object-store URLs (gs://, s3://, ...) through one set of functions.
#
# Local paths use the OS directly (atomic rename, fsync). Anything with a scheme goes through Beam's
# FileSystems, the layer Beam's own sinks use on Dataflow, Spark and Flink: the scheme picks the
# implementation (GCS with apache-beam[gcp], S3 with [aws], ...). Object stores have no directories and
# no atomic rename; an object becomes visible only once its upload completes, which is the atomicity
# the publishing code relies on there.
# --------------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
    """True for URLs handled by a Beam filesystem (``gs://b/x``); False for local paths and ``file://``."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
    return os.path.join(_local(base), *parts)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(_local(path))


def relpath(path: str, root: str) -> str:
    if is_remote(path):
        prefix = root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError(f"expected a path under {root!r}, got {path!r}")
        return path[len(prefix):]
    return os.path.relpath(_local(path), _local(root))


def commonpath(items: list[str]) -> str:
    if any(is_remote(p) for p in items):
        split = [p.rstrip("/").split("/") for p in items]
        common = []
        for parts in zip(*split):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return "/".join(common)
    return os.path.commonpath([_local(p) for p in items])


def exists(path: str) -> bool:
    """A file, or (remote) an object, or (local) a directory."""
    if is_remote(path):
        return _filesystems().exists(path)
    return os.path.exists(_local(path))


def isfile(path: str) -> bool:
    return _filesystems().exists(path) if is_remote(path) else os.path.isfile(_local(path))


def isdir(path: str) -> bool:
    """Local: a directory. Remote: a prefix with at least one object under it."""
    if is_remote(path):
        return bool(_match(path.rstrip("/") + "/**", limit=1))
    return os.path.isdir(_local(path))


def _match(pattern: str, limit: int | None = None) -> list:
    from apache_beam.io.filesystem import BeamIOError

    try:
        result = _filesystems().match([pattern], limits=[limit] if limit else None)[0]
    except BeamIOError:
        return []
    return result.metadata_list


def list_files(path: str) -> list[tuple[str, int]]:
    """[(relative name, size)] of every file under ``path``, recursively, sorted by name."""
    if is_remote(path):
        prefix = path.rstrip("/") + "/"
        return sorted((m.path[len(prefix):], m.size_in_bytes) for m in _match(prefix + "**") if not m.path.endswith("/"))
    root = _local(path)
    out = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            out.append((os.path.relpath(full, root), os.path.getsize(full)))
    return sorted(out)


def list_checksums(path: str) -> dict[str, tuple[int, str]]:
    """{relative name: (size, checksum)} of every object under a remote prefix, from one (paged) listing.

    GCS: the objects' CRC32C (content-based: a renamed or copied object keeps it). Other stores: the
    modification time stands in (``mtime:<seconds>``), as Beam's listing exposes no content hash there.
    """
    if not is_remote(path):
        raise ValueError(f"expected an object-store URL, got local path {path!r}; hint: hash local files instead")
    prefix = path.rstrip("/") + "/"
    if prefix.startswith("gs://"):
        from apache_beam.io.gcp import gcsio

        bucket, _, name_prefix = prefix[len("gs://"):].partition("/")
        client = gcsio.GcsIO().client
        return {
            blob.name[len(name_prefix):]: (int(blob.size), f"crc32c:{blob.crc32c}")
            for blob in client.list_blobs(client.bucket(bucket), prefix=name_prefix)
            if not blob.name.endswith("/")
        }
    return {
        m.path[len(prefix):]: (m.size_in_bytes, f"mtime:{m.last_updated_in_seconds}")
        for m in _match(prefix + "**")
        if not m.path.endswith("/")
    }


def sizes(files: list[str]) -> dict[str, int]:
    """{path: size} (remote files: one listing of their common prefix instead of a request per file)."""
    remote = [f for f in files if is_remote(f)]
    out = {f: os.path.getsize(_local(f)) for f in files if not is_remote(f)}
    if remote:
        root = commonpath(remote) if len(remote) > 1 else dirname(remote[0])
        listed = dict(list_files(root))
        for f in remote:
            name = relpath(f, root)
            if name not in listed:
                raise FileNotFoundError(f"expected an object at {f!r}, got none")
            out[f] = listed[name]
    return out


def listdir(path: str) -> list[str]:
    """Sorted names of the entries (files and directories / common prefixes) directly under ``path``."""
    if is_remote(path):
        return sorted({name.split("/", 1)[0] for name, _ in list_files(path)})
    return sorted(os.listdir(_local(path)))


def getsize(path: str) -> int:
    if is_remote(path):
        found = _match(path)
        if not found:
            raise FileNotFoundError(f"expected an object at {path!r}, got none")
        return found[0].size_in_bytes
    return os.path.getsize(_local(path))


def open_read(path: str, buffering: int = 1 << 20):
    """A binary file object for reading (remote: Beam's stream, uncompressed whatever the extension)."""
    if is_remote(path):
        from apache_beam.io.filesystem import CompressionTypes

        return _filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return open(_local(path), "rb", buffering=buffering)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def makedirs(path: str) -> None:
    """Local: ``mkdir -p``. Remote: nothing (object stores have no directories)."""
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)


def remove_tree(path: str) -> None:
    """Delete a file or a directory tree / every object under a prefix; missing is fine."""
    if is_remote(path):
        names = [join(path, name) for name, _ in list_files(path)]
        if _filesystems().exists(path):
            names.append(path)
        if names:
            _filesystems().delete(names)
        return
    local = _local(path)
    if os.path.isdir(local) and not os.path.islink(local):
        shutil.rmtree(local, ignore_errors=True)
    elif os.path.lexists(local):
        os.unlink(local)


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new, unique directory (remote: a fresh prefix) inside ``parent``."""
    if is_remote(parent):
        return join(parent, f"{prefix}{uuid.uuid4().hex}")
    os.makedirs(_local(parent), exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=_local(parent))


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two locations; the destination appears atomically."""
    if not is_remote(src) and not is_remote(dst):
        local_dst = _local(dst)
        os.makedirs(os.path.dirname(os.path.abspath(local_dst)), exist_ok=True)
        tmp = local_dst + f".tmp-{uuid.uuid4().hex}"
        shutil.copyfile(_local(src), tmp)
        os.replace(tmp, local_dst)
        return
    with open_read(src) as fin, open_write_atomic(dst) as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to the same relative name under ``dst`` (e.g. a dataset to ``gs://``).

    Within one object store the copies are server-side (Beam batches them); no bytes pass through here."""
    names = [name for name, _size in list_files(src)]
    if is_remote(src) and is_remote(dst) and src.split("://")[0] == dst.split("://")[0]:
        if names:
            _filesystems().copy([join(src, n) for n in names], [join(dst, n) for n in names])
        return
    for name in names:
        copy_file(join(src, name), join(dst, name))


def getmtime(path: str) -> float:
    """Seconds since the epoch of the last modification (remote: the object's update time)."""
    if is_remote(path):
        found = _match(path)
        if not found:
            raise FileNotFoundError(f"expected an object at {path!r}, got none")
        return float(found[0].last_updated_in_seconds)
    return os.path.getmtime(_local(path))


def move(src: str, dst: str) -> None:
    """Move a file or a directory tree. Local: one atomic ``os.rename``. Remote: every object under the
    prefix is copied then deleted (object stores cannot rename; Beam batches the requests)."""
    if is_remote(src) or is_remote(dst):
        if _filesystems().exists(src):
            _filesystems().rename([src], [dst])
            return
        names = [name for name, _ in list_files(src)]
        if names:
            _filesystems().rename([join(src, n) for n in names], [join(dst, n) for n in names])
    else:
        os.rename(_local(src), _local(dst))


class open_write_atomic:
    """``with open_write_atomic(path) as f: f.write(...)``: the file appears complete or not at all.

    Local: a temp file in the same directory, fsync, rename, fsync of the directory. Remote: Beam's
    ``FileSystems.create``; the object becomes visible only when the upload completes at close, and an
    exception inside the block abandons the upload. Either way a failed write leaves the old content.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._tmp = None

    def __enter__(self):
        if is_remote(self.path):
            from apache_beam.io.filesystem import CompressionTypes

            self._file = _filesystems().create(self.path, compression_type=CompressionTypes.UNCOMPRESSED)
            return self._file
        directory = os.path.dirname(os.path.abspath(_local(self.path)))
        os.makedirs(directory, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; published files get the usual mode
        self._file = os.fdopen(fd, "wb")
        return self._file

    def __exit__(self, exc_type, exc, tb):
        if is_remote(self.path):
            if exc_type is None:
                self._file.close()
            else:
                _abandon_upload(self._file)
            return False
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, _local(self.path))
                fsync_dir(os.path.dirname(os.path.abspath(_local(self.path))))
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return False


def _abandon_upload(stream) -> None:
    # Closing an upload stream commits it; after an error the object must *not* appear. GCS's writer
    # (google.cloud.storage BlobWriter) cancels its resumable upload with terminate(); streams without
    # one are left unclosed, so their upload is never finalized.
    terminate = getattr(stream, "terminate", None)
    if terminate is not None:
        terminate()
