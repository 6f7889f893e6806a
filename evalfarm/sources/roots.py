"""Which sample sets the farm may read: `EVALFARM_SAMPLE_ROOTS`, checked before any read.

A local path is resolved first (`~`, `..`, symlinks) and must then lie inside a root directory. A URL must
start with a root URL prefix (same scheme and host, on a path boundary), may not climb out of it with `..`
segments, and may not chain another filesystem after it (`::`). So schemes that reach arbitrary hosts
(`http`, `ftp`, `memory`, ...) are refused unless a root names that very prefix: a farm that reads what
anyone submits would read `/etc`, other teams' data or internal URLs for them (OWASP's SSRF class).
`file://` and `local://` URLs are local paths and follow the local rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from evalfarm.errors import NotAllowed
from evalfarm.sources.base import is_url

ROOTS_VARIABLE = "EVALFARM_SAMPLE_ROOTS"
_LOCAL_SCHEMES = ("file://", "local://")  #: fsspec's names for this machine's disk
_QUERY_SCHEMES = ("http://", "https://")  #: where `?` and `#` end the path: `..` after them climbs nothing


@dataclass(frozen=True)
class SampleRoots:
    """The roots, normalized once: real paths of the directories, URL prefixes ending in `/`."""

    dirs: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    restricted: bool = True
    """False on the user's own machine (`evalfarm eval`), where every path the user names may be read."""

    @classmethod
    def parse(cls, roots: Iterable[str]) -> SampleRoots:
        dirs, prefixes = [], []
        for root in roots:
            local = _file_url_path(root) if root.lower().startswith(_LOCAL_SCHEMES) else None
            if local is not None or not is_url(root):
                dirs.append(os.path.realpath(os.path.expanduser(local if local is not None else root)))
            else:
                prefixes.append(_normalize_url(root.rstrip("/")) + "/")
        return cls(tuple(dict.fromkeys(dirs)), tuple(dict.fromkeys(prefixes)))

    @classmethod
    def unrestricted(cls) -> SampleRoots:
        return cls(restricted=False)

    def describe(self) -> str:
        return ",".join((*self.dirs, *self.prefixes))

    def check(self, uri: str, what: str = "samples", *, require_absolute: bool = False) -> None:
        """Raise NotAllowed unless `uri` lies inside a root. Touches the filesystem only to resolve links."""
        if not self.restricted:
            return
        if not self.dirs and not self.prefixes:
            raise NotAllowed(
                f"{what} {uri!r} was refused: this farm reads no sample paths until {ROOTS_VARIABLE} lists the "
                "directories and URL prefixes it may read (e.g. /data/samples,s3://team-bucket/samples/)."
            )
        if self.allows(uri, require_absolute=require_absolute):
            return
        if require_absolute and not is_url(uri) and not os.path.isabs(uri):
            raise NotAllowed(f"{what} {uri!r} was refused: give an absolute path or a URL inside the sample roots "
                             f"of this farm ({ROOTS_VARIABLE}={self.describe()}); a relative path says nothing of "
                             "where it is on the farm")
        raise NotAllowed(
            f"{what} {uri!r} is outside the sample roots of this farm ({ROOTS_VARIABLE}={self.describe()}); "
            "submit a path inside one of them (symlinks and '..' are resolved first), or ask the farm's "
            f"operator to add its directory or URL prefix to {ROOTS_VARIABLE}."
        )

    def allows_file(self, real_path: str) -> bool:
        """Whether a resolved local file (a folder's entry) lies inside a root directory."""
        return not self.restricted or any(_inside(real_path, d) for d in self.dirs)

    def allows(self, uri: str, *, require_absolute: bool = False) -> bool:
        """Whether `uri` lies inside a root (see `check`, which says why not)."""
        if not self.restricted:
            return True
        try:
            return self._allows(uri, require_absolute)
        except ValueError:  # a NUL byte, an unparsable port: nothing that could be read
            return False

    def _allows(self, uri: str, require_absolute: bool) -> bool:
        if uri.lower().startswith(_LOCAL_SCHEMES):
            path = _file_url_path(uri)
            return path is not None and self._allows_path(path, require_absolute=True)
        if not is_url(uri):
            return self._allows_path(uri, require_absolute)
        if "\\" in uri:
            return False
        url = _normalize_url(uri)
        for prefix in self.prefixes:
            if url + "/" == prefix:
                return True
            if url.startswith(prefix):
                rest = url[len(prefix) :]
                if url.lower().startswith(_QUERY_SCHEMES):
                    rest = rest.split("?", 1)[0].split("#", 1)[0]
                if "::" not in rest and ".." not in unquote(rest).split("/"):
                    return True
        return False

    def _allows_path(self, path: str, require_absolute: bool) -> bool:
        if require_absolute and not os.path.isabs(path):
            return False  # relative to what? The farm's working directory is no business of the submitter.
        if not self.dirs:
            return False
        candidates = {path, unquote(path)} if "%" in path else {path}
        return all(
            any(_inside(os.path.realpath(os.path.expanduser(p)), d) for d in self.dirs) for p in candidates
        )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _file_url_path(uri: str) -> str | None:
    """The local path of a `file://` URL; None for one that names another host (or chains filesystems)."""
    if "::" in uri:
        return None
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        return None
    return parts.path or "/"


def _normalize_url(uri: str) -> str:
    """Scheme and host compare without case (`S3://Bucket` is `s3://bucket`); the path compares exactly."""
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a chained URL's head (`simplecache::s3://...`): compare the whole string as written
        return uri
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"
