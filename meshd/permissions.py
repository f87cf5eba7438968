# -*- test-case-name: tests.test_units -*-
"""Who may subscribe to, publish on, and watch what.

A rule names a glob pattern (``fnmatch``, case-sensitive) and the actions it
grants to anonymous and to authenticated sessions.  Channels are matched by
name; watchables by ``"<kind>/<id>"``.  An authenticated session has every
grant an anonymous one has.  What no rule grants is denied.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

SUBSCRIBE, PUBLISH, WATCH = "subscribe", "publish", "watch"
ACTIONS = (SUBSCRIBE, PUBLISH, WATCH)


@dataclass(frozen=True)
class Rule:
    match: str
    anonymous: frozenset[str] = frozenset()
    authenticated: frozenset[str] = frozenset()

    def grants(self, action: str, target: str, authenticated: bool) -> bool:
        granted = action in self.anonymous or (authenticated and action in self.authenticated)
        return granted and fnmatchcase(target, self.match)


class Policy:
    """Answers "may this session do this?", remembering recent answers."""

    _CACHE_SIZE = 10_000

    def __init__(self, rules: "tuple[Rule, ...]" = (), allow_all: bool = False) -> None:
        self.rules = tuple(rules)
        self.allow_all = allow_all
        self._cache: dict[tuple[str, str, bool], bool] = {}

    @classmethod
    def development(cls) -> "Policy":
        return cls(allow_all=True)

    def allows(self, action: str, target: str, authenticated: bool) -> bool:
        if self.allow_all:
            return True
        key = (action, target, authenticated)
        answer = self._cache.get(key)
        if answer is None:
            answer = any(r.grants(action, target, authenticated) for r in self.rules)
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = answer
        return answer
