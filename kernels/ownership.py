"""Whether a result buffer may be written again, decided inside the kernel that writes it.

``MicroLoRA.forward`` hands out the module's result buffer and reuses it once the caller has
let go of it. Asking Python (``sys.getrefcount`` and ``flags.writeable``, which builds a
flags object) costs ~0.1 µs of a ~1.3 µs forward at d = 4096. The
kernel reads the same two facts from the array object itself, which Numba passes along with
every array argument: CPython's reference count (the first field of every object) and NumPy's
flags (a field of ``PyArrayObject_fields``, which NumPy's ABI keeps in place: compiled
extensions read it through the ``PyArray_FLAGS`` macro).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic
from sona.kernels.jit import inline

_PTR = ctypes.sizeof(ctypes.c_void_p)
# PyArrayObject_fields: PyObject_HEAD (2 pointers), data, nd (an int, padded), dimensions,
# strides, base, descr, then flags.
FLAGS_AT = 8 * _PTR
WRITEABLE = 0x0400  # NPY_ARRAY_WRITEABLE
_GIL = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
# Up to 3.13 with the GIL, a reference count above what its owner's own references add up to
# proves another holder; later versions may borrow references on the stack.
COUNTS_PROVE_FREE = sys.version_info < (3, 14) and _GIL
# The references a buffer has, seen from the kernel, when only its module holds it: the
# module's slot, forward's local, the interpreter's stack and the argument tuple Numba's
# wrapper receives (-1, matching no count, where counts prove nothing).
UNHELD_REFS = 4 if COUNTS_PROVE_FREE else -1


@intrinsic
def _object_address(typingctx: Any, ary: Any) -> Any:
    """The address of the Python object an array argument came from (0 if none)."""
    sig = types.intp(ary)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr = context.make_array(signature.args[0])(context, builder, value=args[0])
        return builder.ptrtoint(arr.parent, context.get_value_type(types.intp))

    return sig, codegen


def _loader(kind: Any) -> Any:
    """An intrinsic returning the ``kind`` (a Numba integer type) stored at an address."""

    @intrinsic
    def load(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = builder.inttoptr(args[0], context.get_value_type(kind).as_pointer())
            return builder.load(ptr)

        return kind(types.intp), codegen

    return load


_load_intp = _loader(types.intp)
_load_int32 = _loader(types.int32)


@inline
def references(ary: np.ndarray) -> int:
    """The array object's reference count as the kernel sees it; -1 without an object."""
    at: int = _object_address(ary)  # type: ignore[call-arg]
    return _load_intp(at) if at else -1


@inline
def flags(ary: np.ndarray) -> int:
    """NumPy's flags of the array object (``ndarray.flags.num``); 0 without an object."""
    at: int = _object_address(ary)  # type: ignore[call-arg]
    return _load_int32(at + FLAGS_AT) if at else 0


@inline
def is_free(out: np.ndarray) -> bool:
    """True when only its module holds ``out`` (see :data:`UNHELD_REFS`) and nobody froze it.

    A former holder may have set ``writeable = False`` before letting go: writing the buffer
    would then hand the next caller a read-only result."""
    return references(out) == UNHELD_REFS and (flags(out) & WRITEABLE) != 0
