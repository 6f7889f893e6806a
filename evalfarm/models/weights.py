"""Finding, downloading and verifying the FID-InceptionV3 weights.

The canonical file is the TensorFlow 2015-12-05 graph converted by pytorch-fid; torch-fidelity serves the
same bytes. Neither library checks a hash; we verify the SHA-256 prefix that the file name carries
(torch.hub's convention) and record the full SHA-256 with every result, so a number is always tied to
the exact weights that produced it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from evalfarm.errors import WeightsError
from evalfarm.keys import CANONICAL_INCEPTION_SHA256_PREFIX, is_canonical_inception
from evalfarm.settings import Settings

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
#: the name's hash prefix, as `load_state_dict_from_url(check_hash=True)` checks
CANONICAL_SHA256_PREFIX = CANONICAL_INCEPTION_SHA256_PREFIX
WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
DOWNLOAD_TIMEOUT_S = 60  #: per connection attempt; a firewalled cluster fails fast with instructions


@dataclass(frozen=True)
class Weights:
    """A verified weight file: where it is and what it is."""

    path: Path
    sha256: str

    @property
    def canonical(self) -> bool:
        """True for the published file; numbers from any other file are not comparable to published FIDs."""
        return is_canonical_inception(self.sha256)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_MISSING_HELP = (
    "Download {name} from {url} on a machine with internet access, copy it here, and pass "
    "--weights PATH or set EVALFARM_WEIGHTS=PATH."
)


def resolve_weights(path: str | os.PathLike | None, cache_dir: Path, *, allow_download: bool = True) -> Weights:
    """Return the weights at `path`, or the cached canonical file, downloading it when allowed."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(
                f"Inception weights not found at {p}. " + _MISSING_HELP.format(name=WEIGHTS_FILENAME, url=WEIGHTS_URLS[0])
            )
        return Weights(p, file_sha256(p))
    cached = cache_dir / WEIGHTS_FILENAME
    if cached.is_file():
        return Weights(cached, file_sha256(cached))
    if not allow_download:
        raise WeightsError(
            "Inception weights are not cached and downloading is disabled. "
            + _MISSING_HELP.format(name=WEIGHTS_FILENAME, url=WEIGHTS_URLS[0])
        )
    return download_weights(cached)


def load_weights(settings: Settings, path: str | os.PathLike | None = None) -> Weights:
    """The weights this machine is configured with: `path`, else EVALFARM_WEIGHTS, else the canonical file."""
    return resolve_weights(path or settings.weights, settings.weights_cache, allow_download=settings.allow_download)


def download_weights(dest: Path, urls: tuple[str, ...] = WEIGHTS_URLS) -> Weights:
    """The canonical Inception file, downloaded and verified (see `download_verified`)."""
    sha = download_verified(dest, urls, CANONICAL_SHA256_PREFIX, what="the Inception weights",
                            help_text=_MISSING_HELP.format(name=WEIGHTS_FILENAME, url=urls[0]))
    return Weights(dest, sha)


def download_verified(dest: Path, urls: tuple[str, ...], sha256_prefix: str | None, *, what: str,
                      help_text: str) -> str:
    """Download the first URL that answers to a temporary file, check that its SHA-256 starts with
    `sha256_prefix` (a full digest, or torch.hub's name prefix; None where the publisher gives none), then
    move it into place atomically; returns the file's SHA-256. WeightsError listing every URL's failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            sha = file_sha256(Path(tmp))
            if sha256_prefix is not None and not sha.startswith(sha256_prefix):
                errors.append(f"{url}: SHA-256 {sha} does not start with {sha256_prefix}")
                continue
            os.replace(tmp, dest)
            return sha
        except OSError as exc:
            errors.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise WeightsError(f"Could not download {what} (" + "; ".join(errors) + "). " + help_text)


def load_state_dict(weights: Weights) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects."""
    try:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{weights.path} is not a readable torch weight file: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{weights.path} does not hold a state dict (found {type(state).__name__}).")
    return state
