"""A small, self-describing, checksummed binary container for arrays plus a JSON header.

Adapters and checkpoints are both stored this way. Loading never runs code: the header is
JSON decoded by msgspec, arrays are raw little-endian bytes of a whitelisted dtype.
Everything is validated before any large allocation: sizes are checked against the actual
byte count and hard limits, and the BLAKE2b checksum over the whole body is verified first.

Layout::

    magic (8 bytes) | version u16 | reserved u16 | header_len u32 | payload_len u64
    | header (JSON) | payload (arrays, in header order) | blake2b-256 of everything before
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np

from sona.errors import FormatError, InvalidInputError

VERSION = 1
_PREFIX = struct.Struct("<8sHHIQ")
_DIGEST = 32
MAX_HEADER_BYTES = 1 << 20
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_DTYPES: dict[str, np.dtype[Any]] = {
    "f4": np.dtype("<f4"),
    "f8": np.dtype("<f8"),
    "i8": np.dtype("<i8"),
    "u8": np.dtype("<u8"),
    "u1": np.dtype("u1"),  # raw bytes: nested adapter files, UTF-8 text
}


class ArraySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    dtype: str
    shape: list[int]


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    arrays: list[ArraySpec]
    meta: dict[str, Any]


def encode(magic: bytes, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise ``arrays`` (float32/float64/int64/uint64/uint8) and a JSON-able ``meta``."""
    specs = []
    blobs = []
    for name, arr in arrays.items():
        code = _code_for(arr.dtype)
        specs.append(ArraySpec(name=name, dtype=code, shape=list(arr.shape)))
        blobs.append(np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes())
    header = msgspec.json.encode(Header(kind=kind, arrays=specs, meta=meta))
    payload = b"".join(blobs)
    body = _PREFIX.pack(magic, VERSION, 0, len(header), len(payload)) + header + payload
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def decode(
    data: bytes, magic: bytes, kind: str, *, what: str = "data"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate and decode; every failure is a :class:`FormatError` naming ``what``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    buf = bytes(data)
    n = len(buf)
    if n < _PREFIX.size + _DIGEST:
        raise FormatError(f"{what}: truncated ({n} bytes is shorter than any valid file)")
    got_magic, version, _reserved, header_len, payload_len = _PREFIX.unpack_from(buf, 0)
    if got_magic != magic:
        raise FormatError(f"{what}: not a {kind} file (bad magic {got_magic!r})")
    if version != VERSION:
        raise FormatError(
            f"{what}: unsupported format version {version} (this sona reads {VERSION})"
        )
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"{what}: header length {header_len} exceeds {MAX_HEADER_BYTES}")
    expected = _PREFIX.size + header_len + payload_len + _DIGEST
    if expected != n:
        raise FormatError(
            f"{what}: size mismatch (header says {expected} bytes, file has {n}); "
            "truncated or corrupt"
        )
    body = memoryview(buf)[: n - _DIGEST]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != buf[n - _DIGEST :]:
        raise FormatError(f"{what}: checksum mismatch; the file is corrupt")
    start = _PREFIX.size
    try:
        header = msgspec.json.decode(buf[start : start + header_len], type=Header)
    except msgspec.DecodeError as exc:
        raise FormatError(f"{what}: malformed header: {exc}") from None
    if header.kind != kind:
        raise FormatError(f"{what}: holds a {header.kind!r}, expected {kind!r}")
    arrays: dict[str, np.ndarray] = {}
    offset = start + header_len
    end = offset + payload_len
    for spec in header.arrays:
        dtype = _DTYPES.get(spec.dtype)
        if dtype is None or any(d < 0 for d in spec.shape) or len(spec.shape) > 4:
            raise FormatError(f"{what}: bad array spec for {spec.name!r}")
        count = math.prod(spec.shape)
        size = count * dtype.itemsize
        if size > end - offset or spec.name in arrays:
            raise FormatError(f"{what}: array {spec.name!r} does not fit the payload")
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(spec.shape)
        arrays[spec.name] = arr.astype(dtype.newbyteorder("="), copy=True)
        offset += size
    if offset != end:
        raise FormatError(f"{what}: {end - offset} unexplained payload bytes")
    return header.meta, arrays


def file_target(path: Any) -> Path:
    """``path`` as the file an atomic write replaces, refused before anything is captured or
    written when it cannot be one: an empty path (``Path("")`` is the current directory), a
    directory (the rename onto it would fail naming only the temporary file), or an existing
    FIFO, socket or device (the rename would silently replace it, ``/dev/null`` included, with
    a regular file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if os.fspath(path) == "":
        raise InvalidInputError("path must name a file, got an empty path")
    target = Path(path)
    if target.is_dir():
        raise InvalidInputError(f"path {target} is a directory; pass a file name")
    if target.exists() and not target.is_file():
        raise InvalidInputError(
            f"path {target} is not a regular file (a FIFO, socket or device); pass a file name"
        )
    for ancestor in target.parents:  # the nearest one that exists must be a directory
        if ancestor.exists():
            if not ancestor.is_dir():
                raise InvalidInputError(f"path {target}: {ancestor} is a file, not a directory")
            break
    return target


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, before_replace: Path | None = None
) -> Path:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix.

    Temporary file in the same directory, fsync, rename over the target, fsync the directory.
    ``before_replace``: a file removed (durably) once the new content is safely on disk and
    before it replaces the old, for a file whose old content must not outlive the old ``path``.
    """
    return _write_parts_atomic(path, [data], before_replace)


def write_encoded_atomic(
    path: str | os.PathLike[str],
    magic: bytes,
    kind: str,
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    byte_arrays: Mapping[str, tuple[int, Iterable[bytes]]] | None = None,
) -> int:
    """``write_atomic(path, encode(...))`` without building the file in memory first; its size.

    The arrays are written from their own buffers and the checksum is computed as they go, so a
    large file (a checkpoint) costs no extra copies of its payload. ``byte_arrays`` are uint8
    arrays given as (size, pieces): written after ``arrays`` as if each were the concatenation
    of its pieces, which may be produced lazily, so a payload made of many small records never
    needs one large buffer (large temporary buffers leave the C allocator holding memory it does
    not give back). Pieces that do not add up to their size raise ValueError and write nothing.
    """
    specs = []
    views: list[memoryview] = []
    payload_len = 0
    for name, arr in arrays.items():
        code = _code_for(arr.dtype)
        specs.append(ArraySpec(name=name, dtype=code, shape=list(arr.shape)))
        flat = np.ascontiguousarray(arr, dtype=_DTYPES[code]).reshape(-1)
        view = flat.view(np.uint8).data
        views.append(view)
        payload_len += view.nbytes
    lazy = byte_arrays or {}
    for name, (size, _) in lazy.items():
        specs.append(ArraySpec(name=name, dtype="u1", shape=[size]))
        payload_len += size
    header = msgspec.json.encode(Header(kind=kind, arrays=specs, meta=meta))
    prefix = _PREFIX.pack(magic, VERSION, 0, len(header), payload_len)

    def parts() -> Iterator[bytes | memoryview]:
        digest = hashlib.blake2b(digest_size=_DIGEST)
        head: list[bytes | memoryview] = [prefix, header, *views]
        for part in head:
            digest.update(part)
            yield part
        for name, (size, pieces) in lazy.items():
            written = 0
            for piece in pieces:
                written += len(piece)
                digest.update(piece)
                yield piece
            if written != size:
                raise ValueError(f"{name}: pieces hold {written} bytes, declared {size}")
        yield digest.digest()

    _write_parts_atomic(path, parts())
    return _PREFIX.size + len(header) + payload_len + _DIGEST


def _write_parts_atomic(
    path: str | os.PathLike[str],
    parts: Iterable[bytes | memoryview],
    before_replace: Path | None = None,
) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(before_replace)
                _sync_directory(before_replace.parent)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(target.parent)
    return target


def _sync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _create_temporary(target: Path) -> tuple[int, str]:
    """A new file next to ``target``, open for writing, with the mode ``open(target, "wb")``
    would give it: 0o666 less the umask.

    ``tempfile.mkstemp`` creates files 0o600, which the rename would carry over to the target:
    an adapter exported for a server running as another user would be unreadable to it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(tempfile.TMP_MAX):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name next to {target}")


def open_file(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` open for reading if it is a regular file; a FormatError naming it if not.

    Opened without blocking and checked on the open descriptor, so the check holds for what is
    read: opening a FIFO would otherwise wait for a writer forever, and reading a device such
    as /dev/zero would never end.
    """
    p = Path(path)
    fd = os.open(p, _READ_FLAGS)  # a directory opens too: the check below names it
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FormatError(f"{p}: is a directory, expected a file")
        if not stat.S_ISREG(mode):
            raise FormatError(
                f"{p}: not a regular file (a FIFO, socket or device), expected a file"
            )
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_file(path: str | os.PathLike[str], *, limit: int = 1 << 34) -> bytes:
    if not isinstance(path, (str, os.PathLike)):  # as file_target refuses it for writing
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    p = Path(path)
    with open_file(p) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise FormatError(f"{p}: {size} bytes exceeds the {limit}-byte limit")
        return fh.read()


def _code_for(dtype: np.dtype[Any]) -> str:
    for code, dt in _DTYPES.items():
        if dtype.newbyteorder("<") == dt:  # any byte order: encode writes little-endian
            return code
    raise TypeError(f"unsupported array dtype {dtype}")
