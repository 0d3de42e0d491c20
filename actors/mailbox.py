"""A bounded FIFO with an overflow policy, built on a deque and ``anyio.Event`` waiters.

Why not an anyio memory object stream: DROP_OLDEST needs to evict from the head and a crashed
actor's retry needs to put a message back at the head, neither of which a stream allows; and
the waiters here are created only when a side actually has to wait, so a put into a mailbox with
room, or a get from a non-empty one, never yields to the event loop.

Cancellation never loses an accepted message: a put either appends and returns, or raises
without having appended; a get either pops and returns, or raises without having popped. A
waiter that was woken and then cancelled hands its wake-up on to the next waiter.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from sona.actors.errors import ActorError, ActorStopped, Backpressure

T = TypeVar("T")

__all__ = ["Mailbox", "OverflowPolicy"]


class OverflowPolicy(enum.Enum):
    """What a full mailbox does with one more message."""

    BLOCK = "block"  # the sender waits for room (``*_nowait`` raises Backpressure)
    DROP_OLDEST = "drop_oldest"  # the oldest queued message is dropped to make room
    DROP_NEWEST = "drop_newest"  # the incoming message is dropped
    REJECT = "reject"  # the sender gets Backpressure


_OPEN = 0
_DRAINING = 1  # only senders for which ``may_send()`` is true get through
_CLOSED = 2


class Mailbox(Generic[T]):
    """Bounded FIFO of ``capacity`` items; full behaviour set by ``policy``.

    ``on_drop(item)`` is called for every item a DROP_* policy drops, after the mailbox is
    consistent again; ``dropped`` and ``rejected`` count them.
    """

    __slots__ = (
        "_capacity",
        "_error",
        "_event_cls",
        "_getters",
        "_items",
        "_may_send",
        "_on_drop",
        "_policy",
        "_putters",
        "_state",
        "dropped",
        "name",
        "rejected",
    )

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy = OverflowPolicy.BLOCK,
        *,
        name: str = "mailbox",
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"mailbox capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(policy, OverflowPolicy):
            raise TypeError(f"policy must be an OverflowPolicy, got {policy!r}")
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._policy = policy
        self._getters: deque[anyio.Event] = deque()
        self._putters: deque[anyio.Event] = deque()
        self._state = _OPEN
        self._error: Callable[[], BaseException] | None = None
        self._may_send: Callable[[], bool] | None = None
        self._on_drop = on_drop
        self._event_cls: type[anyio.Event] | None = None
        self.name = name
        self.dropped = 0
        self.rejected = 0

    # -- introspection -------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def policy(self) -> OverflowPolicy:
        return self._policy

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self._capacity

    # -- sending -------------------------------------------------------------------------

    def put_nowait(self, item: T) -> bool:
        """Enqueue without waiting. True if ``item`` was queued, False if DROP_NEWEST dropped it.

        Raises Backpressure when full under BLOCK or REJECT.
        """
        if self._state:
            self._check_open()
        items = self._items
        if len(items) < self._capacity:
            items.append(item)
            if self._getters:
                self._getters.popleft().set()
            return True
        return self._overflow(item)

    async def put(self, item: T) -> bool:
        """Enqueue, waiting for room under BLOCK; otherwise as :meth:`put_nowait`.

        Returns without yielding to the event loop when there is room.
        """
        items = self._items
        if not self._state and len(items) < self._capacity:
            items.append(item)
            if self._getters:
                self._getters.popleft().set()
            return True
        if self._policy is not OverflowPolicy.BLOCK:
            return self.put_nowait(item)
        if self._state:
            self._check_open()
        while len(items) >= self._capacity:
            waiter = self._new_event()
            self._putters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                self._abandon(self._putters, waiter, len(items) < self._capacity)
                raise
            if self._state:
                try:
                    self._check_open()
                except ActorError:
                    # Woken for a free slot, then refused (a drain lets only some senders
                    # through): pass the wake-up on, or a sender that may still send waits
                    # behind it with room free until the drain times out.
                    if len(items) < self._capacity and self._putters:
                        self._putters.popleft().set()
                    raise
        items.append(item)
        if self._getters:
            self._getters.popleft().set()
        return True

    def push_front(self, item: T) -> None:
        """Put ``item`` back at the head, ignoring capacity: for a message taken but not handled."""
        self._items.appendleft(item)
        if self._getters:
            self._getters.popleft().set()

    def _overflow(self, item: T) -> bool:
        policy = self._policy
        if policy is OverflowPolicy.DROP_NEWEST:
            self._drop(item)
            return False
        if policy is OverflowPolicy.DROP_OLDEST:
            items = self._items
            oldest = items.popleft()
            items.append(item)
            self._drop(oldest)
            return True
        self.rejected += 1
        raise Backpressure(
            f"mailbox {self.name!r} is full ({self._capacity} messages, policy {policy.name})"
        )

    def _drop(self, item: T) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(item)

    def _check_open(self) -> None:
        if self._state == _DRAINING:
            if self._may_send is not None and self._may_send():
                return
            raise ActorStopped(f"mailbox {self.name!r} is shutting down and takes no new messages")
        if self._state == _CLOSED:
            raise (
                self._error()
                if self._error is not None
                else ActorStopped(f"mailbox {self.name!r} is closed")
            )

    # -- receiving -----------------------------------------------------------------------

    def get_nowait(self) -> T:
        """The oldest item; ``anyio.WouldBlock`` if there is none."""
        items = self._items
        if items:
            item = items.popleft()
            if self._putters:
                self._putters.popleft().set()
            return item
        if self._state == _CLOSED:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def get(self) -> T:
        """The oldest item, waiting for one; ``anyio.EndOfStream`` once closed and empty."""
        items = self._items
        while not items:
            if self._state == _CLOSED:
                raise anyio.EndOfStream
            await self.wait_nonempty()
        return self.get_nowait()

    async def wait_nonempty(self) -> None:
        """Wait until an item arrives or :meth:`wake_receivers` is called; takes nothing."""
        waiter = self._new_event()
        self._getters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            self._abandon(self._getters, waiter, bool(self._items))
            raise

    def _new_event(self) -> anyio.Event:
        # anyio.Event() looks the backend up on every call (~1.4 µs, on the critical path of a
        # paced hop); the backend's own class, remembered from the first one, costs a third.
        cls = self._event_cls
        if cls is None:
            event = anyio.Event()
            self._event_cls = type(event)
            return event
        return cls()

    def wake_receivers(self) -> None:
        """Wake every task in :meth:`wait_nonempty`, e.g. so an actor notices a stop request."""
        getters = self._getters
        while getters:
            getters.popleft().set()

    # -- lifecycle -----------------------------------------------------------------------

    def start_draining(self, may_send: Callable[[], bool]) -> None:
        """Refuse new items (ActorStopped) except from senders for which ``may_send()`` holds."""
        if self._state == _OPEN:
            self._may_send = may_send
            self._state = _DRAINING

    def close(self, error: Callable[[], BaseException] | None = None) -> None:
        """Refuse every new item with ``error()`` (default ActorStopped); wake every waiter."""
        self._state = _CLOSED
        self._error = error
        for waiters in (self._putters, self._getters):
            while waiters:
                waiters.popleft().set()

    def withdraw(self, match: Callable[[T], bool]) -> T | None:
        """Remove and return the oldest queued item ``match`` accepts, or None: a message its
        sender took back before it was handled, which must stop taking a place in the mailbox
        (a sender blocked on a full one is let in)."""
        items = self._items
        for i, item in enumerate(items):
            if match(item):
                del items[i]
                if self._putters:
                    self._putters.popleft().set()
                return item
        return None

    def queued(self) -> list[T]:
        """Every queued item, oldest first, left in place."""
        return list(self._items)

    def take_all(self) -> list[T]:
        """Remove and return every queued item, oldest first."""
        items = list(self._items)
        self._items.clear()
        while self._putters:
            self._putters.popleft().set()
        return items

    @staticmethod
    def _abandon(waiters: deque[anyio.Event], waiter: anyio.Event, ready: bool) -> None:
        try:
            waiters.remove(waiter)
        except ValueError:
            # Already woken: pass the wake-up on so that it is not lost with this waiter.
            if ready and waiters:
                waiters.popleft().set()
