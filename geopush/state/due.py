"""Due times kept in memory: the memory backend's timers and its outbox's due pushes."""

from __future__ import annotations

import heapq


class DueTimes:
    """Key (a device id, an outbox member) → due time, with a heap to find the due ones
    without scanning every key."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # may hold outdated entries; checked on pop

    def set(self, key: str, due: float | None) -> None:
        if due is None:
            self.discard(key)
            return
        if self._due.get(key) == due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(t, d) for d, t in self._due.items()]
            heapq.heapify(self._heap)

    def discard(self, key: str) -> bool:
        return self._due.pop(key, None) is not None

    def due(self, key: str) -> float | None:
        return self._due.get(key)

    def claim(self, now: float, limit: int, lease_s: float) -> list[str]:
        claimed: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(claimed) < limit:
            due, key = heapq.heappop(heap)
            if self._due.get(key) != due:
                continue  # outdated heap entry
            del self._due[key]
            claimed.append(key)
        for key in claimed:
            # leased, not removed: if the caller never commits, the timer comes back
            self.set(key, now + lease_s)
        return claimed

    def as_dict(self) -> dict[str, float]:
        return dict(self._due)
