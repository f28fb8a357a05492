"""Per-connection message rate limits: a token bucket (route keys ``max_messages_per_second``, ``burst`` and
``rate_limit_action``; defaults in ``[limits]``; docs/pressure.md, "Rate limits").

A connection on a route with a limit gets one :class:`TokenBucket` when it opens; a connection on a route without
one gets none, and its event handler then pays one local ``is not None`` test per message. The bucket holds
``burst`` tokens and starts full; every message the plugin would see takes one; tokens come back at ``rate`` per
second, computed lazily from the loop's clock (no timer, no allocation).

The loop's clock does not move within one iteration, so the messages of one read are judged at one instant: the
connection asks the bucket once per batch of events how many whole tokens it holds (:meth:`TokenBucket.allowance`),
counts them down in a local variable per message (an integer test and decrement, the hot-path cost of a limit),
and gives back what it did not use (:meth:`TokenBucket.spend`). :meth:`TokenBucket.take` is the same for one
message.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Clock", "TokenBucket"]

#: Float arithmetic on the clock can leave a token a hair short (0.1 s at 10/s as 0.9999999999): it still counts.
_EPSILON = 1e-9


class Clock(Protocol):
    """What the bucket reads the time from: the event loop (``EventLoop.now``, monotonic seconds)."""

    now: float


class TokenBucket:
    """``burst`` messages at once, then ``rate`` messages per second on average.

    ``drop`` says what the connection does with a message over it: drop it (True) or close with 1008 (False).
    ``limited`` is set by the connection once it has logged the first refusal (one log line per connection).
    """

    __slots__ = ("_clock", "burst", "drop", "limited", "rate", "stamp", "tokens")

    def __init__(self, clock: Clock, rate: float, burst: int, drop: bool = False) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate={rate!r}, burst={burst!r}")
        self._clock = clock
        self.rate = float(rate)
        self.burst = float(burst)
        self.drop = drop
        self.limited = False
        self.tokens = self.burst  # full at the start: a client may send ``burst`` messages right after opening
        self.stamp = clock.now

    def allowance(self) -> int:
        """Refill up to now; how many messages may pass at this instant (the whole tokens held). The caller
        :meth:`spend` s those it lets through."""
        now = self._clock.now
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        self.tokens = tokens
        return int(tokens + _EPSILON) if tokens > 0.0 else 0

    def spend(self, n: int) -> None:
        """``n`` messages of the last :meth:`allowance` went through."""
        self.tokens -= n

    def take(self) -> bool:
        """One message now: True (and one token fewer) when within the budget, False when over it."""
        if self.allowance():
            self.tokens -= 1.0
            return True
        return False

    def stop(self) -> None:
        """Refuse everything from now on (the connection is being closed for going over the limit)."""
        self.rate = 0.0
        self.tokens = 0.0

    def __repr__(self) -> str:
        return f"<TokenBucket {self.rate:g}/s burst {self.burst:g} tokens {self.tokens:.2f}>"
