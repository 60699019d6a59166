"""Which sessions a notebook may see and act on: its own.

Every notebook's ``%session`` lines run in a host process that can open the whole
registry, and a notebook is untrusted code: unchecked, ``%session use other`` and a
``print`` read another notebook's variables, and ``%session close other`` ended it. So
the sandbox kernel hands the commands a :class:`SessionScope`: a notebook (its binding
key, see ``SandboxKernel.binding_key``) owns the sessions it created or forked (the
registry's ``owner``) and the one it is bound to (its session, or one the user's
configuration named). Everything else looks to it as if it did not exist: the same
words whether a session is another notebook's or nobody's, so a notebook cannot probe
for names. The API, the CLI and the magics of a host IPython act with the user's own
rights and have no scope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Registry
    from .session import AsyncSession


class SessionScope:
    """The sessions of one notebook (every session when ``see_all``)."""

    def __init__(self, registry: Registry, key: str, see_all: bool = False) -> None:
        self.registry = registry
        self.key = key
        self.see_all = see_all

    def owns(self, row: dict[str, Any], bound: str | None = None) -> bool:
        """Whether the notebook may see and act on the session of ``row`` (``bound``: the
        notebook's bound session, when the caller has read it already)."""
        if self.see_all or row.get("owner") == self.key:
            return True
        return (bound if bound is not None else self.registry.bound(self.key)) == row["id"]

    def find(self, key: str) -> dict[str, Any] | None:
        """The notebook's session called ``key`` (a name or an id), or None: a session of
        that name that is not the notebook's does not hide one of its own."""
        bound = self.registry.bound(self.key)
        return next((row for row in self.registry.matches(key) if self.owns(row, bound)),
                    None)

    def visible(self, sessions: list[AsyncSession]) -> list[AsyncSession]:
        """Those of ``sessions`` the notebook owns (one registry read, not one per session)."""
        if self.see_all:
            return sessions
        bound = self.registry.bound(self.key)
        owned = {row["id"] for row in self.registry.sessions() if row.get("owner") == self.key}
        return [s for s in sessions if s.id == bound or s.id in owned]

    def claim(self, session: AsyncSession) -> None:
        """A session the notebook made (created or forked): from now on it is its own."""
        self.registry.set_owner(session.id, self.key)
