"""What a strategy object keeps from one translation to the next.

Both keep two generations, the current one and the one before: an entry unused for a
whole generation is gone, so they hold about one config's worth and never grow with
churn. A generation is a translation, or for a ``Memo`` with ``max_entries`` that many
entries (for what a translation touches only in part, such as the routes of the few
shard tables a push rebuilds).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``build(key)`` once per key while translations keep asking for it."""

    def __init__(self, build: Callable[[K], V], max_entries: int | None = None) -> None:
        self._build = build
        self._max_entries = max_entries
        self._last: dict[K, V] = {}
        self._now: dict[K, V] = {}

    def next_translation(self) -> None:
        if self._max_entries is None:
            self._last, self._now = self._now, {}

    def __call__(self, key: K) -> V:
        try:
            return self._now[key]
        except KeyError:
            pass
        value = self._last[key] if key in self._last else self._build(key)
        self._now[key] = value
        if self._max_entries is not None and len(self._now) >= self._max_entries:
            self._last, self._now = self._now, {}
        return value


class Reuse:
    """Resources the previous translation built, by resource name, with the arguments
    they were built from: the same arguments again give the very same message, which
    the SnapshotCache then neither serializes nor sends again. Arguments compare by
    identity first (a shard no change touched is the same mapping) and by value only
    for what changed."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self._now: dict[str, tuple[tuple[Any, ...], Any]] = {}

    def next_translation(self) -> None:
        self._last, self._now = self._now, {}

    def get(self, name: str, build: Callable[..., V], *args: Any) -> V:
        built = self._now.get(name) or self._last.get(name)
        if built is None or not _same(built[0], args):
            built = (args, build(*args))
        self._now[name] = built
        return built[1]


def _same(before: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    return len(before) == len(now) and all(
        a is b or a == b for a, b in zip(before, now, strict=True)
    )
