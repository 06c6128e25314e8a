"""Pacing background work (repair copies, prune deletions) to a rate, so it never starves
client traffic."""

from twisted.internet import task


class Pace:
    """Reservations of a rate, first come first served: each waits for its turn."""

    def __init__(self):
        self.next_start = 0.0

    async def take(self, clock, amount: float, rate: float):
        """Reserve ``amount`` (bytes, copies) of ``rate`` per second; wait for the turn."""
        now = clock.seconds()
        start = max(now, self.next_start)
        self.next_start = start + amount / rate
        if start > now:
            await task.deferLater(clock, start - now)
