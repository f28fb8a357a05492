"""Presence: who is in a group, on every instance (docs/presence.md).

Each instance knows its own members exactly (the server's groups). What the *other* instances have is kept here,
in :class:`ClusterView`, up to date through the broker: join and leave deltas, a snapshot when this instance first
takes an interest in a group (or asks again after the broker reconnected), and heartbeats. An instance that misses
three heartbeats is gone: its members are removed from every group, and the groups are told (the chat says
``left``). With the memory broker there are no other instances and the view stays empty.

Reads are synchronous: :meth:`Server.presence` is the local members plus this view. It is exact for the groups
this instance has members in (it receives their deltas); for other groups the server API asks the other instances
(:meth:`Broker.presence_query`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_INFO_BYTES", "ClusterView", "Member", "check_info"]

#: A member's ``info`` as JSON is at most this long: presence is replicated to every interested instance.
MAX_INFO_BYTES = 1024


def check_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``info`` as a plain dict that survives JSON; :class:`ValueError` when it does not or is too big."""
    if info is None:
        return {}
    try:
        text = json.dumps(dict(info), separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"presence info must be JSON: {exc}") from None
    if len(text.encode("utf-8")) > MAX_INFO_BYTES:
        raise ValueError(f"presence info is at most {MAX_INFO_BYTES} bytes of JSON")
    decoded: dict[str, Any] = json.loads(text)
    return decoded


@dataclass(frozen=True, slots=True)
class Member:
    """One session in a group: its id (``<instance>.<n>``), its instance, its user (``sub`` on an ``auth = "jwt"``
    route, else None) and the small ``info`` dict the plugin gave when it joined (the chat: the name)."""

    session: str
    instance: str
    user: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"session": self.session, "instance": self.instance, "user": self.user, "info": dict(self.info)}

    def wire(self) -> list[Any]:
        """Compact form in broker messages: ``[session, user, info]`` (the instance is the sender's)."""
        return [self.session, self.user, dict(self.info)]

    @staticmethod
    def from_wire(instance: str, item: Any) -> Member:
        """The inverse of :meth:`wire`; :class:`ValueError` for anything else."""
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and (item[1] is None or isinstance(item[1], str)) and isinstance(item[2], dict)):
            raise ValueError("malformed presence member")
        return Member(item[0], instance, item[1], item[2])


class ClusterView:
    """The members other instances have, by group; fed by the broker, read by the server."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Member]] = {}  # group -> session id -> member (other instances only)
        self.last_seen: dict[str, float] = {}  # instance -> loop time its last message arrived

    def members(self, group: str) -> list[Member]:
        found = self.groups.get(group)
        return list(found.values()) if found else []

    def instances(self, group: str) -> set[str]:
        return {m.instance for m in self.groups.get(group, {}).values()}

    def heard(self, instance: str, now: float) -> None:
        self.last_seen[instance] = now

    def join(self, group: str, member: Member, now: float) -> None:
        self.groups.setdefault(group, {})[member.session] = member
        self.last_seen[member.instance] = now

    def leave(self, group: str, session: str) -> Member | None:
        found = self.groups.get(group)
        if not found:
            return None
        member = found.pop(session, None)
        if not found:
            del self.groups[group]
        return member

    def snapshot(self, group: str, instance: str, members: list[Member], now: float) -> list[Member]:
        """``instance`` has exactly ``members`` in ``group``: replace what we had of it; the members removed."""
        self.last_seen[instance] = now
        found = self.groups.setdefault(group, {})
        gone = [m for m in found.values() if m.instance == instance]
        for m in gone:
            del found[m.session]
        for m in members:
            found[m.session] = m
        if not found:
            del self.groups[group]
        keep = {m.session for m in members}
        return [m for m in gone if m.session not in keep]

    def drop_instance(self, instance: str) -> dict[str, list[Member]]:
        """Forget ``instance`` (it said goodbye, or missed its heartbeats): its members, by group."""
        self.last_seen.pop(instance, None)
        removed: dict[str, list[Member]] = {}
        for group in list(self.groups):
            found = self.groups[group]
            gone = [m for m in found.values() if m.instance == instance]
            if gone:
                for m in gone:
                    del found[m.session]
                removed[group] = gone
                if not found:
                    del self.groups[group]
        return removed

    def expire(self, now: float, timeout: float) -> dict[str, list[Member]]:
        """Drop every instance not heard from for ``timeout`` seconds; what was removed, by group."""
        removed: dict[str, list[Member]] = {}
        for instance, seen in list(self.last_seen.items()):
            if now - seen > timeout:
                for group, gone in self.drop_instance(instance).items():
                    removed.setdefault(group, []).extend(gone)
        return removed

    def refresh(self, now: float) -> None:
        """We could not hear anyone for a while (our broker connection was down, or our loop stalled): give every
        known instance a fresh window instead of declaring them all gone."""
        for instance in self.last_seen:
            self.last_seen[instance] = now

    def forget(self, group: str) -> None:
        """We no longer follow ``group`` (no local members): its deltas stop coming, so its view would go stale."""
        self.groups.pop(group, None)
