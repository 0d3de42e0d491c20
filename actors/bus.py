"""Broadcast of events to any number of subscribers, like tokio's broadcast channel.

Publishing is synchronous and never waits: each subscriber has its own bounded buffer and a
subscriber that falls behind loses its oldest unread events, then receives one in-band
:class:`Lagged` saying how many, and goes on with the newest. So a subscriber that never reads
costs memory bounded by its buffer, and never slows the publisher or the other subscribers.

Numbering: the bus, not the publisher, owns ``seq``. ``publish`` returns the event with ``seq``
set to the next number (and ``at`` set to ``time.time()`` when it was left at 0.0), built with
``msgspec.structs.replace``. Any msgspec Struct with ``at`` and ``seq`` fields can be published,
so layers above define their own events and share one numbering on one bus.
"""

from __future__ import annotations

import time
from collections import deque
from types import TracebackType
from typing import Any, TypeVar

import anyio
import msgspec
from sona.actors.events import Lagged

E = TypeVar("E", bound=msgspec.Struct)

__all__ = ["EventBus", "Subscription"]


class Subscription:
    """One subscriber's view of a bus: an async iterator of events, used as a context manager.

    Registered on ``__aenter__`` and removed on ``__aexit__``; iteration ends once the bus is
    closed and the buffer is empty.
    """

    __slots__ = (
        "_buffer",
        "_bus",
        "_capacity",
        "_closed",
        "_entered",
        "_kinds",
        "_last_missed_seq",
        "_missed",
        "_waiter",
        "total_missed",
    )

    def __init__(self, bus: EventBus, buffer: int, kinds: Any = None) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int):
            raise TypeError(f"subscribe(buffer=...) must be an int, got {type(buffer).__name__}")
        if buffer < 1:
            raise ValueError(f"subscribe(buffer=...) must be >= 1, got {buffer}")
        self._bus = bus
        self._capacity = buffer
        self._kinds = _kinds_tuple(kinds)
        self._buffer: deque[Any] = deque()
        self._missed = 0
        self._last_missed_seq = 0
        self._waiter: anyio.Event | None = None
        self._closed = False
        self._entered = False
        self.total_missed = 0

    def _push(self, event: Any) -> None:
        buffer = self._buffer
        if len(buffer) >= self._capacity:
            lost = buffer.popleft()
            self._missed += 1
            self._last_missed_seq = lost.seq
        buffer.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def _close(self) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    @property
    def pending(self) -> int:
        """Events buffered and not yet received (a pending ``Lagged`` not included)."""
        return len(self._buffer)

    def receive_nowait(self) -> Any:
        """The next event; ``anyio.WouldBlock`` if none, ``anyio.EndOfStream`` once closed."""
        if self._missed:
            missed, self._missed = self._missed, 0
            self.total_missed += missed
            return Lagged(missed=missed, seq=self._last_missed_seq, at=time.time())
        if self._buffer:
            return self._buffer.popleft()
        if self._closed:
            raise anyio.EndOfStream
        if not self._entered:
            # Not registered on the bus, nothing will ever arrive: waiting would hang for good.
            raise RuntimeError(
                "this subscription was never entered: use `async with bus.subscribe() as sub:`"
            )
        raise anyio.WouldBlock

    async def receive(self) -> Any:
        """The next event, waiting for one; ``anyio.EndOfStream`` once the bus is closed."""
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                waiter = self._waiter = anyio.Event()
                try:
                    await waiter.wait()
                finally:
                    if self._waiter is waiter:
                        self._waiter = None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Subscription:
        if self._entered or self._closed:
            raise RuntimeError("a subscription can be entered only once; subscribe again instead")
        self._entered = True
        self._bus._add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bus._remove(self)
        self._close()


def _kinds_tuple(kinds: Any) -> tuple[type[Any], ...] | None:
    if kinds is None:
        return None
    if isinstance(kinds, type):
        kinds = (kinds,)
    if isinstance(kinds, (str, bytes)):
        raise TypeError(f"kinds must be event classes, got the string {kinds!r}")
    try:
        items = tuple(kinds)
    except TypeError:
        raise TypeError(
            f"kinds must be an event class or an iterable of them, got {type(kinds).__name__}"
        ) from None
    for kind in items:
        # events are msgspec Structs: any other class would match nothing, silently
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            raise TypeError(
                f"kinds must be event classes (msgspec Structs), got {kind!r} "
                f"({type(kind).__name__})"
            )
    return items


class EventBus:
    """Broadcast channel for msgspec Struct events that carry ``at`` and ``seq`` fields."""

    def __init__(self, *, clock: Any = time.time) -> None:
        self._subscribers: list[Subscription] = []
        # event class -> whether any subscriber takes it; rebuilt lazily after (un)subscribing
        self._wanted: dict[type[Any], bool] = {}
        self._seq = 0
        self._clock = clock
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the most recent event published (0 before the first)."""
        return self._seq

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, event: E) -> int:
        """Number ``event`` and hand it to every matching subscriber; never waits.

        Returns the number of subscribers that received it. Publishing on a closed bus is
        allowed and reaches nobody, so late events during shutdown never raise. ``event`` must
        be a msgspec Struct with ``at`` and ``seq`` fields; anything else is refused before it
        takes a number, whether or not anyone subscribes to it.
        """
        if not isinstance(event, msgspec.Struct) or "seq" not in event.__struct_fields__:
            raise TypeError(
                f"publish() takes a msgspec Struct event with `at` and `seq` fields, "
                f"got {type(event).__name__}"
            )
        self._seq += 1
        if self._closed:
            return 0
        if not self.wants(type(event)):  # nobody would see it: skip stamping a copy
            return 0
        if getattr(event, "at", None) == 0.0:
            event = msgspec.structs.replace(event, seq=self._seq, at=self._clock())
        else:
            event = msgspec.structs.replace(event, seq=self._seq)
        delivered = 0
        for sub in self._subscribers:
            kinds = sub._kinds
            if kinds is None or isinstance(event, kinds):
                sub._push(event)
                delivered += 1
        return delivered

    def wants(self, kind: type[Any]) -> bool:
        """Whether any current subscriber takes events of ``kind``: a publisher on a hot path
        can skip building an event nobody would receive."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            wanted = self._wanted[kind] = any(
                s._kinds is None or issubclass(kind, s._kinds) for s in self._subscribers
            )
        return wanted

    def subscribe(self, *, buffer: int = 256, kinds: Any = None) -> Subscription:
        """A subscription (enter it with ``async with``) to events of ``kinds``: an event class
        or an iterable of them (all events if None). Checked here, because a kind that is not a
        class would otherwise fail only at the next ``publish``, inside the publisher.

        A subscriber sees only events published after it entered. ``Lagged`` is always
        delivered, whatever ``kinds`` says. ``seq`` numbers every event on the bus, so a
        subscription to some kinds sees gaps where events of other kinds were published;
        events it lost are reported by ``Lagged`` alone.
        """
        return Subscription(self, buffer, kinds)

    def close(self) -> None:
        """End every subscription once it has read what it buffered."""
        self._closed = True
        for sub in self._subscribers:
            sub._close()

    def _add(self, sub: Subscription) -> None:
        if self._closed:
            sub._close()  # ends at once; not registered, so it neither receives nor lingers
            return
        # Copy on write: a publish iterating the old list is never disturbed.
        self._subscribers = [*self._subscribers, sub]
        self._wanted = {}

    def _remove(self, sub: Subscription) -> None:
        self._subscribers = [s for s in self._subscribers if s is not sub]
        self._wanted = {}
