"""``broadcast``: fan-out on ``/broadcast/{channel}``.

A message from one client goes verbatim (same opcode) to every other client on the same channel, in order, and
never back to its sender. The frame is encoded once by :meth:`ServerAPI.broadcast` for all recipients.

With history on the route (``history_size``, docs/history.md):

* the option ``envelope = true`` sends each message as ``{"offset": N, "epoch": "E", "data": "..."}`` (text) or
  ``{"offset": N, "epoch": "E", "data_b64": "..."}`` (binary), so a client always knows where it is; right after
  the upgrade (and after any replay) it also gets ``{"epoch": "E", "offset": N}``, the channel's position, plus
  ``"recovered": true|false`` when it asked for one;
* a client connecting with ``?since=E:N`` first receives every message above N (``recovered`` true), or nothing
  when the epoch differs or messages were trimmed (``recovered`` false: reload your state), then live traffic.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from selectws.plugins.api import Plugin, Recovery, ServerAPI, Session, option
from selectws.server.history import parse_since


@dataclass(frozen=True)
class BroadcastOptions:
    """The broadcast route's ``options``."""

    channel: str | None = option(None, non_empty=True)
    """The one channel of a route without a ``{channel}`` parameter (absent: ``default``)."""
    envelope: bool = False
    """With history: send each message as ``{"offset": N, "epoch": "E", "data": ...}`` (docs/history.md)."""


class BroadcastPlugin(Plugin):
    """Joins each connection to the group named by the ``channel`` path parameter (or the option ``channel``)."""

    Options = BroadcastOptions
    opts: BroadcastOptions

    def __init__(self, server: ServerAPI, options: Mapping[str, Any]) -> None:
        super().__init__(server, options)
        fixed = self.opts.channel
        self.fixed = f"broadcast:{fixed}" if fixed else None
        self.envelope = self.opts.envelope

    def _group(self, session: Session) -> str:
        channel = session.params.get("channel") or self.opts.channel or "default"
        return f"broadcast:{channel}"

    def owns_group(self, group: str) -> bool:
        return group == self.fixed if self.fixed is not None else group.startswith("broadcast:")

    def with_position(self, group: str, message: str | bytes, offset: int, epoch: str) -> str | bytes:
        if not self.envelope:
            return message
        if isinstance(message, str):
            return json.dumps({"offset": offset, "epoch": epoch, "data": message}, ensure_ascii=False,
                              separators=(",", ":"))
        data = base64.b64encode(message).decode("ascii")
        return f'{{"offset":{offset},"epoch":{json.dumps(epoch)},"data_b64":"{data}"}}'

    def on_open(self, session: Session) -> None:
        raw = session.query.get("since")
        since = parse_since(raw) if raw else None
        if raw and since is None:
            session.close(1008, "bad ?since= (expected E:N, the epoch and offset of the last message)")
            return
        if not self.envelope:
            session.join(self._group(session), since=since)
            return

        def position(recovery: Recovery) -> None:
            if recovery.epoch is None:  # no history on this route: nothing to say
                return
            answer: dict[str, Any] = {"epoch": recovery.epoch, "offset": recovery.offset}
            if recovery.recovered is not None:
                answer["recovered"] = recovery.recovered
            session.send_text(json.dumps(answer, separators=(",", ":")))

        session.join(self._group(session), since=since, then=position)

    def on_message(self, session: Session, message: str | bytes) -> None:
        self.server.broadcast(self._group(session), message, exclude=session)
