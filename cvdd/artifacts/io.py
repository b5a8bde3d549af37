"""How artifacts are written and checked: atomic writes, JSON and tensor files, digests, recipe fingerprints.

Files are written to a temporary name in the same folder and renamed into place, so a killed run never
leaves a half-written artifact that a later stage would trust.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import mmap
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.serialization import set_default_mmap_options, skip_data

from cvdd.runtime import log
from cvdd.runtime.errors import UserError
from cvdd.runtime.finite import NonFiniteError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(fileobj)`` into a temp file, then rename it into place. A full disk or a name
    the file system refuses is a :class:`~cvdd.runtime.errors.UserError` naming the file and what to do."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; artifacts are shared files
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        named = named_os_error(err, path)
        if named is not None:
            raise named from err
        raise
    return path


class DiskFullError(UserError, OSError):
    """No space left where an artifact is written."""


class NameTooLongError(UserError, OSError):
    """A file or folder name longer than the file system allows."""


def named_os_error(err: BaseException, path: Path) -> UserError | None:
    """The user's version of an ``OSError`` whose cause is theirs to fix (a full disk, a name too long)."""
    if not isinstance(err, OSError) or isinstance(err, UserError):
        return None
    if err.errno == errno.ENOSPC:
        return DiskFullError(
            f"no space left on the device while writing {path}; free some space (or point paths.artifacts at another "
            "disk) and run the same command: finished work is kept and the half-written file was removed"
        )
    if err.errno == errno.ENAMETOOLONG:
        longest = max(Path(path).parts, key=len)
        return NameTooLongError(
            f"the name {longest[:60]}… is {len(longest.encode())} bytes, more than the file system allows (usually "
            "255); choose a shorter name (set=<name>, dataset.name=<name>)"
        )
    return None


def save_json(path: Path | str, obj: Any) -> Path:
    """``obj`` as JSON at ``path``, atomically. A NaN or infinity anywhere in it is refused (a record never states a
    number that is not one): the last guard behind each stage's own finiteness checks."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=False)
    except ValueError as err:
        raise NonFiniteError(f"{path} would record a NaN or infinite number ({err}); nothing was written") from err
    return atomic_write(path, lambda fh: fh.write((text + "\n").encode()))


def load_json(path: Path | str, repair: str = "rebuild it") -> Any:
    """The JSON at ``path``; a damaged file is an :class:`ArtifactCorruptError` that says how to ``repair`` it (the
    command that makes it again)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactCorruptError(f"{path} is not valid JSON ({err}); it is damaged: {repair}") from err


def load_record(path: Path | str, keys: Sequence[str] = (), repair: str = "rebuild it", what: str = "a record") -> dict:
    """The JSON object at ``path`` holding ``keys``; a file that is not JSON, or JSON that is not such an object
    (``{}``, ``[]``), is an :class:`ArtifactCorruptError` naming ``what`` it should be and how to ``repair`` it."""
    record = load_json(path, repair)
    if not isinstance(record, dict) or any(key not in record for key in keys):
        lacks = f": it lacks {', '.join(keys)}" if keys else ""
        raise ArtifactCorruptError(f"{path} is damaged (not {what}{lacks}); {repair}")
    return record


def load_json_if_intact(path: Path | str, redo: str, keys: Sequence[str] = ()) -> dict | None:
    """The record at ``path`` (a JSON object holding ``keys``); ``None`` when there is none, or when it is damaged
    (logged with ``redo``, what the stage does instead)."""
    if not Path(path).is_file():
        return None
    try:
        return load_record(path, keys)
    except ArtifactCorruptError:
        log.warning("%s is damaged; %s", path, redo)
        return None


HASHED = {"bytes": 0}  # bytes hashed by this process so far (bench/scale.py reads it; nothing else does)
CHUNK = 16 << 20


def sha256_hex(data: bytes) -> str:
    HASHED["bytes"] += len(data)
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path | str) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, as manifests record their files; read in chunks of 16 MiB, so
    hashing a 30 GB set takes no more memory than a small one."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    HASHED["bytes"] += size
    return {"bytes": size, "sha256": digest.hexdigest()}


def damaged_files(folder: Path, recorded: Mapping[str, Mapping[str, Any]], hashes: bool = True) -> list[str]:
    """The recorded files (relative to ``folder``) that are missing, of another size or, with ``hashes``,
    of other content. Manifests written before files were recorded have nothing to check against."""

    def intact(path: Path, digest: Mapping[str, Any]) -> bool:
        if not path.is_file() or path.stat().st_size != digest["bytes"]:
            return False
        return not hashes or file_digest(path)["sha256"] == digest["sha256"]

    return [name for name, digest in recorded.items() if not intact(folder / name, digest)]


def check_files(folder: Path, recorded: Mapping[str, Mapping[str, Any]], rebuild: str, hashes: bool = False) -> None:
    """Refuse an artifact whose recorded files are missing or altered, before any work uses it."""
    bad = damaged_files(folder, recorded, hashes)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ArtifactCorruptError(
            f"{folder / bad[0]}{more} is missing or damaged (its size or content differs from the manifest); "
            f"rebuild it: {rebuild}"
        )


def load_tensors(path: Path | str, rebuild: str, digest: Mapping[str, Any] | None = None, mapped: bool = False) -> Any:
    """``torch.load`` (weights only) of an artifact file; a missing, altered (``digest``) or unreadable file is an
    :class:`ArtifactCorruptError` naming the file and the command that rebuilds it. ``mapped`` memory-maps the
    tensors instead of reading them: what the caller never touches is never read (a unit file's metadata without
    its images); a digest needs every byte, so it cannot be mapped."""
    path = Path(path)
    if mapped and digest is not None:
        raise ValueError("a digest check reads the whole file; load it unmapped")
    try:
        data = None if mapped else path.read_bytes()
    except FileNotFoundError as err:
        raise ArtifactCorruptError(f"{path} is missing; rebuild it: {rebuild}") from err
    if digest is not None and (len(data) != digest["bytes"] or sha256_hex(data) != digest["sha256"]):
        raise ArtifactCorruptError(f"{path} differs from the file its manifest records; rebuild it: {rebuild}")
    try:
        if mapped:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ArtifactCorruptError(f"{path} is missing; rebuild it: {rebuild}") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise ArtifactCorruptError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"it is damaged or truncated; rebuild it: {rebuild}"
        ) from err


def save_tensors(path: Path | str, obj: Any) -> Path:
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def record_offsets(path: Path | str) -> dict[int, list[int]]:
    """Where each stored record's bytes start in a tensor file (a zip archive of uncompressed records), by record
    size: ``{size: [offset, …]}``, from each record's local header (zip spec: 30 fixed bytes, then the name and the
    extra field, whose lengths sit at bytes 26 and 28)."""
    offsets: dict[int, list[int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        for info in archive.infolist():
            fh.seek(info.header_offset)
            header = fh.read(30)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            offsets.setdefault(info.file_size, []).append(info.header_offset + 30 + name_length + extra_length)
    return offsets


class InPlaceTensors:
    """The tensors of a tensor file being filled in place (see :func:`streamed_tensors`)."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], fd: int):
        self.fd = fd
        with set_default_mmap_options(mmap.MAP_SHARED):
            self.mapped = torch.load(path, weights_only=True, mmap=True)
        offsets = record_offsets(path)
        self.rows: dict[str, tuple[int, int]] = {}  # name → (offset of row 0, bytes per row)
        for name, (shape, dtype) in shapes.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if len(offsets.get(nbytes, [])) == 1 and shape:
                self.rows[name] = (offsets[nbytes][0], nbytes // shape[0])

    def write_rows(self, name: str, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """``tensor[positions[i]] = rows[i]`` written straight to the file (``os.pwrite``), so the rows never
        become resident in this process (a mapped write would keep every touched page in its RSS). For a tensor
        whose record size is unique in the file; the others are filled through ``mapped``."""
        offset, row_bytes = self.rows[name]
        data = rows.contiguous().numpy()
        if data.shape[0] and data[0].nbytes != row_bytes:
            raise ValueError(f"rows of {tuple(rows.shape[1:])} do not fit {name}'s rows of {row_bytes} bytes")
        for position, row in zip(positions.tolist(), data, strict=True):
            os.pwrite(self.fd, row.data, offset + position * row_bytes)  # the row's own buffer: no copy


@contextmanager
def streamed_tensors(
    path: Path | str, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> Iterator[InPlaceTensors]:
    """A tensor file of ``{name: tensor}`` written in place, one slice at a time: yields the file's tensors to fill
    (memory-mapped for small ones, :meth:`InPlaceTensors.write_rows` for large ones), then syncs the file and renames
    it into place. :func:`load_tensors` reads it like a file of :func:`save_tensors` (its bytes differ, but are the
    same for the same tensors), and writing it holds no tensor in memory: a set larger than the host's memory is
    assembled piece by piece."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with FakeTensorMode():  # shapes without storage: the skeleton's data regions are left to be filled
            skeleton = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
        with open(tmp, "wb") as fh, skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, fh)
        tensors = InPlaceTensors(Path(tmp), shapes, fd)
        yield tensors
        del tensors  # unmaps: the filled pages belong to the file
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def fingerprint(obj: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able recipe (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ArtifactCorruptError(UserError, ValueError):
    """An artifact file is missing, truncated, altered or unreadable."""


class ArtifactConflictError(UserError, RuntimeError):
    """An artifact exists but was made by a different recipe."""


class ArtifactNotWritableError(UserError, RuntimeError):
    """A stage's output folder cannot take new files (read-only, not a folder, disk full)."""


def ensure_writable(*folders: Path | str) -> None:
    """Create ``folders`` and write (then remove) a probe file in each, so a stage fails before its work, not
    after it. A probe rather than ``os.access``: that says yes to root on a read-only mount."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            named = named_os_error(err, folder)
            if named is not None:
                raise named from err
            raise ArtifactNotWritableError(
                f"cannot write to {folder} ({err.strerror or err}); make it writable, or point paths.artifacts "
                f"(paths.logs for run folders) at a writable folder"
            ) from err


@dataclass(frozen=True)
class NamedArtifact:
    """``<root>/<dataset>/<stage>/<name>/`` with a ``manifest.json`` that is written last."""

    stage: ClassVar[str]
    root: Path
    dataset: str
    name: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.dataset / self.stage / self.name

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"
