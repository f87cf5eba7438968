# -*- test-case-name: tests.test_units -*-
"""Who may subscribe to, publish on, and watch what.

A rule names a glob pattern (``fnmatch``, case-sensitive) and the actions it
grants to anonymous and to authenticated sessions.  Channels are matched by
name; watchables by ``"<kind>/<id>"``.  An authenticated session has every
grant an anonymous one has.  What no rule grants is denied.

A rule's pattern may name the session's principal as ``#{sub}``: for
principal ``alice``, ``user.#{sub}`` matches ``user.alice`` and nothing else
(the principal is matched literally, its glob characters escaped), and no
anonymous session.  A session may also hold :class:`Grants` of its own, from
its token's claims; those add to what the rules allow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Optional

SUBSCRIBE, PUBLISH, WATCH = "subscribe", "publish", "watch"
ACTIONS = (SUBSCRIBE, PUBLISH, WATCH)

#: Stands for the session's principal in a rule's ``match``.
PRINCIPAL_PLACEHOLDER = "#{sub}"


def escape_glob(text: str) -> str:
    """``text`` as an ``fnmatch`` pattern that matches exactly ``text``."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@dataclass(frozen=True)
class Rule:
    match: str
    anonymous: frozenset[str] = frozenset()
    authenticated: frozenset[str] = frozenset()

    @property
    def personal(self) -> bool:
        """Whether the pattern names the principal (``#{sub}``)."""
        return PRINCIPAL_PLACEHOLDER in self.match

    def grants(self, action: str, target: str, authenticated: bool, principal: Optional[str] = None) -> bool:
        granted = action in self.anonymous or (authenticated and action in self.authenticated)
        if not granted:
            return False
        if self.personal:
            if principal is None:
                return False
            return fnmatchcase(target, self.match.replace(PRINCIPAL_PLACEHOLDER, escape_glob(principal)))
        return fnmatchcase(target, self.match)


@dataclass(frozen=True)
class Grants:
    """Patterns a session may subscribe to, publish on and watch beyond the rules (from its token)."""

    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.publish or self.watch)

    def allows(self, action: str, target: str) -> bool:
        return any(fnmatchcase(target, pattern) for pattern in getattr(self, action, ()))

    @classmethod
    def from_claim(cls, claim: Any) -> "Grants":
        """The grants of a token's ``meshd`` claim, ``{"subscribe": [...], "publish": [...], "watch": [...]}``
        (each list optional); raise ValueError if it has another shape."""
        if claim is None:
            return NO_GRANTS
        if not isinstance(claim, dict):
            raise ValueError("the meshd claim must be an object")
        unknown = set(claim) - set(ACTIONS)
        if unknown:
            raise ValueError(f"the meshd claim has unknown keys {sorted(unknown)}")
        lists = {}
        for action, patterns in claim.items():
            if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"meshd.{action} must be a list of non-empty patterns")
            lists[action] = tuple(patterns)
        return cls(**lists)


NO_GRANTS = Grants()


class Policy:
    """Answers "may this session do this?", remembering recent answers."""

    _CACHE_SIZE = 10_000

    def __init__(self, rules: "tuple[Rule, ...]" = (), allow_all: bool = False) -> None:
        self.rules = tuple(rules)
        self.allow_all = allow_all
        self._shared = tuple(r for r in self.rules if not r.personal)
        #: Rules naming the principal: their answers differ per principal, so they are not cached.
        self._personal = tuple(r for r in self.rules if r.personal)
        self._cache: dict[tuple[str, str, bool], bool] = {}

    @classmethod
    def development(cls) -> "Policy":
        return cls(allow_all=True)

    def allows(self, action: str, target: str, authenticated: bool, principal: Optional[str] = None,
               grants: Grants = NO_GRANTS) -> bool:
        """Whether a rule, or else one of the session's own ``grants``, allows ``action`` on ``target``."""
        if self.allow_all:
            return True
        key = (action, target, authenticated)
        answer = self._cache.get(key)
        if answer is None:
            answer = any(r.grants(action, target, authenticated) for r in self._shared)
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = answer
        if answer:
            return True
        if principal is not None and any(r.grants(action, target, authenticated, principal) for r in self._personal):
            return True
        return grants.allows(action, target)
