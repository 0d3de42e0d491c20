"""The checksummed container behind adapter files: exact round trips, refusal of anything else."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sona import container
from sona.errors import FormatError, InvalidInputError

MAGIC = b"TESTMAGC"
PREFIX = struct.Struct("<8sHHIQ")

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint64])
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
)


@settings(max_examples=60, deadline=None)
@given(
    named=st.dictionaries(st.text(min_size=1, max_size=8), arrays, max_size=4),
    meta=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=8), st.booleans(), st.none()),
        max_size=4,
    ),
)
def test_round_trip_is_bit_exact(named: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    data = container.encode(MAGIC, "thing", meta, named)
    got_meta, got = container.decode(data, MAGIC, "thing")
    assert got_meta == meta
    assert list(got) == list(named)
    for name, arr in named.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        assert got[name].tobytes() == arr.tobytes()  # NaN payloads included
        assert got[name].flags.writeable  # a private copy, not a view of the buffer


def test_non_native_byte_order_and_layout_are_normalised() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran order
    _, got = container.decode(container.encode(MAGIC, "k", {}, {"a": arr}), MAGIC, "k")
    np.testing.assert_array_equal(got["a"], arr)
    assert got["a"].dtype == np.float32 and got["a"].dtype.isnative


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex64, np.bool_, object])
def test_unsupported_dtypes_are_refused_at_encode(dtype: Any) -> None:
    with pytest.raises(TypeError, match="dtype"):
        container.encode(MAGIC, "k", {}, {"a": np.zeros(2, dtype=dtype)})


def forge(header: dict[str, Any], payload: bytes, magic: bytes = MAGIC, version: int = 1) -> bytes:
    """A file with a valid checksum around an arbitrary header: tests the checks behind it."""
    head = msgspec.json.encode(header)
    body = PREFIX.pack(magic, version, 0, len(head), len(payload)) + head + payload
    return body + hashlib.blake2b(body, digest_size=32).digest()


def spec(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def test_forge_builds_what_encode_builds() -> None:
    """Guards the refusal tests: a forged file of valid content decodes."""
    arr = np.arange(3, dtype=np.float32)
    forged = forge({"kind": "k", "arrays": [spec("a", "f4", [3])], "meta": {}}, arr.tobytes())
    assert forged == container.encode(MAGIC, "k", {}, {"a": arr})


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "truncated"),
        (b"x" * 10, "truncated"),
        (forge({"kind": "k", "arrays": [], "meta": {}}, b"", magic=b"OTHERMAG"), "magic"),
        (forge({"kind": "k", "arrays": [], "meta": {}}, b"", version=2), "version"),
        (forge({"kind": "other", "arrays": [], "meta": {}}, b""), "expected 'k'"),
        (forge({"kind": "k", "arrays": [], "meta": {}, "x": 1}, b""), "header"),
        (forge({"kind": "k", "meta": {}}, b""), "header"),
        (forge({"kind": "k", "arrays": [], "meta": []}, b""), "header"),
        (forge({"kind": "k", "arrays": [spec("a", "f2", [1])], "meta": {}}, b"\0\0"), "spec"),
        (forge({"kind": "k", "arrays": [spec("a", "f4", [-1])], "meta": {}}, b""), "spec"),
        (forge({"kind": "k", "arrays": [spec("a", "f4", [1] * 5)], "meta": {}}, b"\0" * 4), "spec"),
        (forge({"kind": "k", "arrays": [spec("a", "f4", [2])], "meta": {}}, b"\0" * 4), "fit"),
        (
            forge({"kind": "k", "arrays": [spec("a", "f4", [2**40, 2**40])], "meta": {}}, b""),
            "fit",
        ),
        (
            forge(
                {"kind": "k", "arrays": [spec("a", "f4", [1]), spec("a", "f4", [1])], "meta": {}},
                b"\0" * 8,
            ),
            "fit",
        ),
        (forge({"kind": "k", "arrays": [spec("a", "f4", [1])], "meta": {}}, b"\0" * 8), "payload"),
    ],
)
def test_invalid_files_are_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(FormatError, match=words) as info:
        container.decode(data, MAGIC, "k", what="my.file")
    assert "my.file" in str(info.value)


def test_lengths_that_disagree_with_the_size_are_refused() -> None:
    good = container.encode(MAGIC, "k", {"a": 1}, {"x": np.ones(3, np.float32)})
    _, version, reserved, hlen, plen = PREFIX.unpack_from(good)
    for h, p in ((hlen + 1, plen), (hlen, plen - 1), (container.MAX_HEADER_BYTES + 1, plen)):
        bad = PREFIX.pack(MAGIC, version, reserved, h, p) + good[PREFIX.size :]
        with pytest.raises(FormatError):
            container.decode(bad, MAGIC, "k")


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        container.decode("text", MAGIC, "k")  # type: ignore[arg-type]


def test_write_atomic_creates_parents_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert container.write_atomic(target, b"one") == target
    container.write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]
    assert container.read_file(target) == b"two"
    with pytest.raises(FormatError, match="limit"):
        container.read_file(target, limit=2)
    with pytest.raises(FormatError, match="directory"):
        container.read_file(tmp_path)


def test_a_fifo_is_not_replaced_by_an_atomic_write(tmp_path: Path) -> None:
    """The rename would swap a FIFO (or a device: ``/dev/null``) for a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        container.file_target(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert container.file_target(tmp_path / "new.bin") == tmp_path / "new.bin"
