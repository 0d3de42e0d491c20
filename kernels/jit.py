"""The one place that decides how kernels are compiled.

``cache=True`` keeps start-up at ~0.2 s once the on-disk cache is warm; ``nogil=True`` lets the
Deep loop run kernels in a worker thread without stealing the event loop. Two kinds hold the GIL
instead (:func:`gil_kernel`): those that update a live adapter's weights in place, and the
vector-sized ones that handle one embedding; :func:`held_kernel` twins of GIL-free kernels do
the same where those work on a live adapter.
``fastmath`` is limited to reassociation-style flags so float32 reductions vectorise while NaN
and inf still propagate (the finiteness checks depend on that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])

FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})


def kernel(fn: F) -> F:
    """Compile ``fn`` as a cached, GIL-free, float32-friendly Numba kernel."""
    return cast(F, numba.njit(cache=True, nogil=True, fastmath=set(FASTMATH))(fn))


def gil_kernel(fn: F) -> F:
    """Compiled like :func:`kernel` but holding the GIL, for two kinds of kernel.

    One writes a published adapter's weights in place: a reader in another thread then sees
    the adapter either before or after the update, never half-written (a few microseconds; no
    copy needed). The other is vector-sized, one embedding at a time (forward of one vector
    and its checks): giving the GIL up for a microsecond buys no parallelism. On the event
    loop's thread a busy worker that takes it may keep it for a whole switch interval (5 ms);
    in a worker thread, taking it back from a busy event loop can wait as long.

    Both kinds are compiled without Numba's runtime (``_nrt=False``): they cannot allocate (an
    allocation is a compile error, which keeps the request path allocation-free), and each
    array argument is passed without creating a reference-counting record, ~0.06 µs less per
    forward call."""
    options: dict[str, Any] = {"_nrt": False}  # not in Numba's typed signature
    return cast(F, numba.njit(cache=True, nogil=False, fastmath=set(FASTMATH), **options)(fn))


def held_kernel(fn: F) -> F:
    """Compiled like :func:`kernel`, Numba's runtime included, but holding the GIL: the twin
    of a GIL-free kernel, for when it reads or writes a live adapter, which the event loop
    updates in place while a reader in another thread may read it. Holding the GIL, the two
    never overlap: the reader sees the adapter before or after a step, never during one. The
    GIL-free original stays for private copies, which worker threads step and read."""
    return cast(F, numba.njit(cache=True, nogil=False, fastmath=set(FASTMATH))(fn))


def strict_kernel(fn: F) -> F:
    """Compiled like :func:`kernel` but without fast-math flags, for scalar bookkeeping that
    must round exactly like the Python floats it mirrors. Kernels it calls keep their flags.

    ``fastmath=False`` is set, not left out: a function that leaves it out takes the flags of
    whichever caller compiles it first, and keeps them in its cache entry for every caller,
    so a fast-math kernel calling it would change how it rounds from then on."""
    return cast(F, numba.njit(cache=True, nogil=True, fastmath=False)(fn))


def strict_inline(fn: F) -> F:
    """A helper of a :func:`strict_kernel`, inlined into it."""
    return cast(F, numba.njit(cache=True, nogil=True, fastmath=False, inline="always")(fn))


def inline(fn: F) -> F:
    """A helper that other kernels call; compiled the same way and inlined by LLVM."""
    compiled = numba.njit(cache=True, nogil=True, fastmath=set(FASTMATH), inline="always")(fn)
    return cast(F, compiled)


def entry_point(dispatcher: Any, *example_args: Any) -> Callable[..., Any]:
    """The compiled wrapper for exactly the types of ``example_args``, skipping dispatch.

    Numba's dispatcher resolves argument types on every call (~0.1 µs per array argument). Hot
    paths whose arguments are always C-contiguous float32 arrays of a fixed rank call the
    compiled wrapper directly. The wrapper does not check types: callers must guarantee them.
    """
    dispatcher(*example_args)
    signature = tuple(numba.typeof(a) for a in example_args)  # type: ignore[no-untyped-call]
    return dispatcher.overloads[signature].entry_point  # type: ignore[no-any-return]
