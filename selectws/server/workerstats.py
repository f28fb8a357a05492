"""The figures of every worker, in memory all of them share: what makes ``/metrics``, ``/readyz`` and ``/admin``
one instance when ``[server] workers = N``.

The supervisor maps a :class:`WorkerTable` (anonymous shared memory, ``MAP_SHARED``) before it forks; each worker
writes its own slot -- a JSON sample of its figures, the Prometheus text of its metrics included -- once a second
from a timer of its loop, and again right before it answers ``/metrics``, ``/readyz`` or an admin snapshot, then
reads every other slot. No system call, no blocking, no round trip to the supervisor: the worker that took the
request answers for the whole instance at once.

Why counters cannot go backwards between two scrapes: a slot has one writer (its worker), whose counters only
grow; a reader always gets that slot's latest complete write; and the worker answering a scrape writes its own
slot first. So whatever a scrape saw of a slot, any later scrape (answered by any worker) sees at least that.
A restarted worker starts its own series again from 0 (a counter reset, as for any restarted process; Prometheus'
``rate()`` and ``increase()`` take it in their stride), and the supervisor clears the slot of a worker that exited.

A slot is double-buffered so that a reader never sees a half-written sample: the writer fills the half that is not
current, then flips the slot's index. Each half carries its length and CRC-32; a read that does not check out (the
writer flipped twice during the read, or died in the middle) is retried, and never returns torn data.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Sequence

__all__ = ["SLOT_SIZE", "WorkerSlot", "WorkerTable", "merge_metrics"]

#: Bytes per worker: two halves, each a 16-byte header (sequence, length, CRC-32) and the sample. A sample is a
#: few KiB (most of it the metrics text); a larger one is refused by :meth:`WorkerTable.write`.
SLOT_SIZE = 256 * 1024
_EMPTY = 0xFFFFFFFF
_INDEX = struct.Struct("<I")
_HEADER = struct.Struct("<QII")  # sequence, length, crc32
_SLOT_HEAD = 16  # the index (4 bytes) and padding
_TABLE_HEAD = 64  # the table's own header: until when someone watches the admin page (a float, epoch seconds)
_WATCHED = struct.Struct("<d")


class WorkerTable:
    """``slots`` fixed-size slots of shared memory; create it before forking, use it in every process."""

    def __init__(self, slots: int, slot_size: int = SLOT_SIZE) -> None:
        self.slots = slots
        self.slot_size = slot_size
        self.half = (slot_size - _SLOT_HEAD) // 2
        self.capacity = self.half - _HEADER.size  # the largest sample a slot holds
        # Anonymous and MAP_SHARED: the children see the same pages.
        self._mm = mmap.mmap(-1, _TABLE_HEAD + slots * slot_size)
        self._seq = [0] * slots
        for slot in range(slots):
            _INDEX.pack_into(self._mm, self._base(slot), _EMPTY)

    def _base(self, slot: int) -> int:
        return _TABLE_HEAD + slot * self.slot_size

    def _half(self, slot: int, index: int) -> int:
        return self._base(slot) + _SLOT_HEAD + index * self.half

    @property
    def watched_until(self) -> float:
        """Until when (``time.time()``) some worker has a watcher on its admin page: the others then include what
        only the page shows (the busiest groups) in their samples."""
        return float(_WATCHED.unpack_from(self._mm, 0)[0])

    @watched_until.setter
    def watched_until(self, when: float) -> None:
        _WATCHED.pack_into(self._mm, 0, when)

    def write(self, slot: int, payload: bytes) -> bool:
        """Publish ``payload`` as ``slot``'s sample (by its one writer); False (nothing written) if it is too big."""
        n = len(payload)
        if n > self.capacity:
            return False
        mm = self._mm
        base = self._base(slot)
        current = _INDEX.unpack_from(mm, base)[0]
        index = 1 if current == 0 else 0
        at = self._half(slot, index)
        self._seq[slot] += 1
        mm[at + _HEADER.size : at + _HEADER.size + n] = payload
        _HEADER.pack_into(mm, at, self._seq[slot], n, zlib.crc32(payload))
        _INDEX.pack_into(mm, base, index)  # the flip: from now on readers take this half
        return True

    def read(self, slot: int) -> bytes | None:
        """``slot``'s latest complete sample; None when it is empty (no worker, or it exited)."""
        mm = self._mm
        base = self._base(slot)
        for _ in range(4):
            index = _INDEX.unpack_from(mm, base)[0]
            if index == _EMPTY:
                return None
            if index > 1:
                continue
            at = self._half(slot, index)
            _, n, crc = _HEADER.unpack_from(mm, at)
            if n > self.capacity:
                continue
            data = mm[at + _HEADER.size : at + _HEADER.size + n]
            if zlib.crc32(data) == crc and _INDEX.unpack_from(mm, base)[0] == index:
                return data
        return None

    def clear(self, slot: int) -> None:
        """Forget ``slot``'s sample (the supervisor, once its worker has exited: no writer is left)."""
        _INDEX.pack_into(self._mm, self._base(slot), _EMPTY)

    def close(self) -> None:
        self._mm.close()


class WorkerSlot:
    """A worker's view of the table: its own slot to write, every slot to read."""

    def __init__(self, table: WorkerTable, index: int) -> None:
        self.table = table
        self.index = index

    @property
    def workers(self) -> int:
        return self.table.slots

    def write(self, payload: bytes) -> bool:
        return self.table.write(self.index, payload)

    def read_all(self) -> list[tuple[int, bytes]]:
        """``(slot, sample)`` of every slot that holds one, in slot order."""
        out = []
        for slot in range(self.table.slots):
            data = self.table.read(slot)
            if data is not None:
                out.append((slot, data))
        return out


# ---------------------------------------------------------------------------------------------------- metrics
def _with_label(line: str, name: str, value: str) -> str:
    """A sample line of the exposition format with ``name="value"`` as its first label."""
    label = f'{name}="{value}"'
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):  # a metric name has neither; a label value may have both
        return f"{line[: brace + 1]}{label},{line[brace + 1 :]}"
    return f"{line[:space]}{{{label}}}{line[space:]}"


def merge_metrics(texts: Sequence[tuple[int, str]],
                  extra: Sequence[tuple[str, str, str, Sequence[tuple[int, float]]]] = ()) -> str:
    """One exposition document from the documents of several workers: every family once (``# HELP``, ``# TYPE``,
    in the order they first appear), with the samples of each worker labelled ``worker="<slot>"``.

    ``extra``: families to append, as ``(name, kind, help, [(worker, value), ...])``.
    """
    order: list[str] = []
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in heads:
                        order.append(family)
                        heads[family] = []
                        samples[family] = []
                    if len(heads[family]) < 2 and not any(h.split(" ", 2)[1] == parts[1] for h in heads[family]):
                        heads[family].append(line)
                continue
            if family:
                samples[family].append(_with_label(line, "worker", str(worker)))
    lines: list[str] = []
    for family in order:
        lines += heads[family]
        lines += samples[family]
    for name, kind, help_text, values in extra:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for worker, value in values:
            lines.append(f'{name}{{worker="{worker}"}} {value}')
    return "\n".join(lines) + "\n"
