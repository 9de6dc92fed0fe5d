"""Packing: several encoded samples per row of at most ``max_len`` tokens, so batches carry no padding.

Rows are filled by best-fit decreasing (longest sample first, each into the row whose free space fits it most
tightly), which usually reaches 95%+ of capacity. A row lists its documents back to back; ``positions`` restart at 0
and ``document_ids`` count 0, 1, 2, ... per document, so the model attends only within a document. Labels need no
boundary handling: a document's last label is its own (-100 at its end, or the true next token if it was cut).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

from lmforge.data.encode import Sample

__all__ = ["plan_rows", "pack_samples"]


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign sample indices to rows (best-fit decreasing); every length must be ``<= capacity``.

    Free space is bucketed by size (``room -> rows with exactly that room``), so each placement costs one bisect over
    at most ``capacity`` distinct sizes: O(n log capacity) whatever the number of rows. Deterministic.
    """
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> rows with that much free space
    rooms: list[int] = []  # sorted keys of by_room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            rows.append([])
            r, room = len(rows) - 1, capacity
        else:
            room = rooms[k]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        rows[r].append(i)
        room -= n
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(r)
    return rows


def pack_samples(samples: Sequence[Sample], capacity: int) -> tuple[list[dict[str, list[int]]], float]:
    """Pack samples into rows of ``<= capacity`` tokens; a longer sample is truncated (right) first.

    Returns ``(rows, efficiency)``: each row has ``tokens``, ``labels``, ``positions`` and ``document_ids`` (python int
    lists of one length T <= capacity); efficiency = real tokens / (rows * capacity).
    """
    samples = [s if len(s.tokens) <= capacity else Sample(s.tokens[:capacity], s.labels[:capacity], s.source)
               for s in samples]
    rows = []
    for members in plan_rows([len(s.tokens) for s in samples], capacity):
        row: dict[str, list[int]] = {"tokens": [], "labels": [], "positions": [], "document_ids": []}
        for doc, i in enumerate(members):
            s = samples[i]
            row["tokens"] += s.tokens
            row["labels"] += s.labels
            row["positions"] += range(len(s.tokens))
            row["document_ids"] += [doc] * len(s.tokens)
        rows.append(row)
    used = sum(len(s.tokens) for s in samples)
    return rows, used / (len(rows) * capacity) if rows else 0.0
