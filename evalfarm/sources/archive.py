"""Image files inside a tar (plain or compressed) or zip archive, local or through fsspec."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from typing import IO, Any

import numpy as np

from evalfarm.errors import SourceError
from evalfarm.sources.base import (
    IMAGE_EXTENSIONS,
    Source,
    decode_image,
    has_image_extension,
    is_hidden,
    is_url,
    open_binary,
    reason,
    sha256_file,
)

_INDEX_VERSION = 1


def _file_stamp(file: str | int) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: its inode, size and modification time (as make and
    rsync judge it; not the device, which differs between the clients of one network filesystem)."""
    st = os.stat(file)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _ArchiveSource(Source):
    """Regular image-file members sorted by full member name; dot-files (`__MACOSX/._x.png`) skipped.

    The member index is built once, in the constructor, and travels with the pickle, so workers do not
    rescan the archive; each process opens its own handle on first read.
    """

    _handle_attrs = ("_archive", "_raw")
    _kind = "archive"

    def __init__(self, uri: str, index: bytes | None = None) -> None:
        super().__init__(uri)
        self._remote = is_url(uri)
        self._path = uri if self._remote else os.path.expanduser(uri)
        if not self._remote and not os.path.isfile(self._path):
            raise SourceError(f"{uri} is not a file")
        self._stat = None if self._remote else _file_stamp(self._path)
        if index is not None:
            members = self._members_from_index(index)
            if members is not None:
                self._members = members
                return
        raw = open_binary(self._path)
        try:
            self._members: list[Any] = self._list_members(raw)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot read {uri} as a {self._kind} archive: {reason(exc)}") from exc
        finally:
            raw.close()

    def _list_members(self, raw: IO[bytes]) -> list[Any]:
        raise NotImplementedError

    def _members_from_index(self, index: bytes) -> list[Any] | None:
        """The members `index` lists, or None when it is not an index of this very file (then it is rescanned)."""
        return None

    def _open_archive(self, raw: IO[bytes]) -> Any:
        raise NotImplementedError

    def _read_member(self, archive: Any, member: Any) -> bytes:
        raise NotImplementedError

    def _member_name(self, member: Any) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._members)

    def name_of(self, index: int) -> str:
        return f"{self.uri}:{self._member_name(self._members[self._check_index(index)])}"

    def load(self, index: int) -> np.ndarray:
        member = self._members[self._check_index(index)]
        name = self.name_of(index)
        with self._in_this_process():  # one shared file position per process: seek+read must not interleave
            try:
                if self._archive is None:
                    raw = open_binary(self._path)
                    try:
                        if self._stat is not None and _file_stamp(raw.fileno()) != self._stat:
                            raise SourceError("the file changed since it was listed (replaced or rewritten)")
                        self._archive = self._open_archive(raw)
                    except BaseException:
                        raw.close()
                        raise
                    self._raw = raw
                data = self._read_member(self._archive, member)
            except Exception as exc:
                raise SourceError(f"cannot read {name}: {reason(exc)}") from exc
        return decode_image(data, name)  # outside the lock: decoding is the slow part and runs in parallel

    def _compute_hash(self) -> str:
        return sha256_file(self._path)

    def describe_empty(self) -> str:
        exts = ", ".join(f"*.{e}" for e in IMAGE_EXTENSIONS)
        return f"{self.uri} contains no images: no regular-file members named {exts} (dot-files skipped)"


class TarSource(_ArchiveSource):
    """Images in a `.tar`, `.tar.gz` or `.tgz` (compression auto-detected).

    A compressed tar has no random access: reading a member before the last one read restarts decompression
    from the start of the archive, and every DataLoader worker decompresses on its own. Fine for one
    in-order pass; use a plain `.tar` or a zip when reading out of order.
    """

    _kind = "tar"

    def _list_members(self, raw: IO[bytes]) -> list[tarfile.TarInfo]:
        found: dict[str, tarfile.TarInfo] = {}
        with tarfile.open(fileobj=raw, mode="r:*") as tar:
            for info in tar:
                if info.isreg() and not is_hidden(info.name) and has_image_extension(info.name):
                    found[info.name] = info  # a name added twice: the later copy wins, as on extraction
        return [found[name] for name in sorted(found)]

    def _open_archive(self, raw: IO[bytes]) -> tarfile.TarFile:
        return tarfile.open(fileobj=raw, mode="r:*")

    def _read_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        fp = archive.extractfile(member)
        if fp is None:  # pragma: no cover - only regular files are indexed
            raise SourceError(f"{member.name} is not a regular file")
        with fp:
            return fp.read()

    def _member_name(self, member: tarfile.TarInfo) -> str:
        return member.name

    # Listing a tar reads every member's header: tens of seconds for a million members, in each process that
    # opens it. The index is the listing as arrays, stamped with the file's inode, size and modification time:
    # an index of another file, or of this file before it changed, is not used, and a file that changes after
    # it was opened is refused when it is read (`load` compares the stamp of the file it opens).

    def index(self) -> bytes | None:
        if self._stat is None or any(m.sparse is not None for m in self._members):  # sparse: the listing's own
            return None
        names = "\0".join(m.name for m in self._members).encode("utf-8", "surrogateescape")
        where = np.array([[m.offset, m.offset_data, m.size] for m in self._members], np.int64).reshape(-1, 3)
        buf = io.BytesIO()
        np.savez(buf, version=np.int64(_INDEX_VERSION), stamp=np.array(self._stat, np.int64),
                 names=np.frombuffer(names, np.uint8), where=where)
        return buf.getvalue()

    def _members_from_index(self, index: bytes) -> list[tarfile.TarInfo] | None:
        try:
            with np.load(io.BytesIO(index), allow_pickle=False) as z:
                if int(z["version"]) != _INDEX_VERSION or tuple(z["stamp"].tolist()) != self._stat:
                    return None
                names = z["names"].tobytes().decode("utf-8", "surrogateescape").split("\0")
                where = z["where"]
        except Exception:  # not an index (damaged, foreign): the archive is listed instead
            return None
        if where.ndim != 2 or where.shape != (len(names), 3) or (len(names) == 1 and not names[0]):
            return None
        offset, offset_data, size = where[np.argsort(where[:, 0], kind="stable")].T  # in file order
        if (names != sorted(set(names)) or any(is_hidden(n) or not has_image_extension(n) for n in names)
                or (offset < 0).any() or (offset_data < offset + tarfile.BLOCKSIZE).any() or (size < 0).any()
                or (offset_data[:-1] + size[:-1] > offset[1:]).any()):
            return None  # not what listing this file gives (names, or members that overlap): listed instead
        members = []
        for name, (offset, offset_data, size) in zip(names, where.tolist(), strict=True):
            info = tarfile.TarInfo(name)
            info.offset, info.offset_data, info.size, info.type = offset, offset_data, size, tarfile.REGTYPE
            members.append(info)
        return members


class ZipSource(_ArchiveSource):
    """Images in a `.zip`; members are read directly by their offsets (random access is cheap)."""

    _kind = "zip"

    def _list_members(self, raw: IO[bytes]) -> list[str]:
        found = set()
        with zipfile.ZipFile(raw) as zf:
            for info in zf.infolist():
                if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                    continue
                if not is_hidden(info.filename) and has_image_extension(info.filename):
                    found.add(info.filename)
        return sorted(found)

    def _open_archive(self, raw: IO[bytes]) -> zipfile.ZipFile:
        return zipfile.ZipFile(raw)

    def _read_member(self, archive: zipfile.ZipFile, member: str) -> bytes:
        return archive.read(member)

    def _member_name(self, member: str) -> str:
        return member
