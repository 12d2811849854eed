"""Download-once file cache with checksum verification.

Files live under ``$DFQ_HOME`` (default ``~/.cache/dfq``). A cached file whose
checksum matches is used without touching the network; a mismatch is an error
(never silently re-downloaded over, so a tampered cache is noticed). Downloads
go to a temporary file in the cache directory and are renamed into place only
after the checksum matches, so an interrupted download never leaves a file that
looks complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dfq.errors import ChecksumError, DFQError

__all__ = ["RemoteFile", "dfq_home", "fetch", "file_digest", "verify_file"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A published file: where to get it and how to recognise it.

    Attributes:
        urls: mirrors, tried in order.
        filename: name of the file in the cache (the extracted member for archives).
        sha256: full hex digest, or the hex prefix that publishers put in file
            names (``resnet20-12fca82f.th``), of ``filename``.
        sha1: used only where the publisher gives nothing else (pytorchcv).
        zip_member: if set, the URL is a zip archive and this member is extracted.
    """

    urls: tuple[str, ...]
    filename: str
    sha256: str | None = None
    sha1: str | None = None
    zip_member: str | None = None

    def __post_init__(self) -> None:
        if not (self.sha256 or self.sha1):
            raise ValueError(f"{self.filename}: a RemoteFile needs a checksum")


def dfq_home() -> Path:
    """The cache root: ``$DFQ_HOME`` or ``~/.cache/dfq``."""
    return Path(os.environ.get("DFQ_HOME", Path.home() / ".cache" / "dfq")).expanduser()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks so large files stay out of memory."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, remote: RemoteFile) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has ``remote``'s checksum."""
    algorithm, expected = ("sha256", remote.sha256) if remote.sha256 else ("sha1", remote.sha1)
    assert expected is not None
    actual = file_digest(path, algorithm)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(
            f"{path}: {algorithm} is {actual[:16]}..., expected {expected[:16]}...; "
            "the file is corrupt or not the published one (delete it to download again)"
        )


def fetch(remote: RemoteFile, subdir: str = "", *, progress: bool = True) -> Path:
    """Return the local path of ``remote``, downloading it if it is not cached.

    Set ``DFQ_OFFLINE=1`` to forbid network access (a missing file is then an error).
    """
    target_dir = dfq_home() / subdir
    target = target_dir / remote.filename
    if target.exists():
        verify_file(target, remote)
        return target
    if os.environ.get("DFQ_OFFLINE", "") not in ("", "0"):
        raise DFQError(f"{remote.filename} is not in the cache ({target_dir}) and DFQ_OFFLINE is set")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DFQError(f"cannot create cache directory {target_dir}: {e.strerror}") from e
    errors = []
    for url in remote.urls:
        try:
            _download_verified(url, remote, target, progress)
            return target
        except (urllib.error.URLError, OSError, zipfile.BadZipFile, KeyError) as e:
            errors.append(f"{url}: {e}")
    raise DFQError(f"could not download {remote.filename}: " + "; ".join(errors))


def _download_verified(url: str, remote: RemoteFile, target: Path, progress: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        if remote.zip_member:
            _extract_member(tmp, remote.zip_member)
        verify_file(tmp, remote)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _extract_member(archive: Path, member: str) -> None:
    """Replace the zip ``archive`` in place by its ``member``, streaming."""
    extracted = archive.with_suffix(".member")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(extracted, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        os.replace(extracted, archive)
    finally:
        extracted.unlink(missing_ok=True)
