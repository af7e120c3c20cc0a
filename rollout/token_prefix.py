"""``TokenPrefixIndex``: which recorded token contexts are an exact prefix of a new prompt, longest first.

A chat request matched by its messages is the common case (``rollout.chat_sessions``); this index serves the
rest: a prompt that *starts with the exact tokens* of a conversation the server answered (its prompt plus the
completion it returned) — a /v1/completions token prompt, or a chat whose fresh rendering reproduces them.

Entries are bucketed by a chained hash of their context's full blocks of ``block`` tokens::

    context  t_0 .. t_{L-1}:   [ block 0 ][ block 1 ] ... [ block k-1 ][ tail < block ]
    key      = h_k,  h_0 = SEED,  h_{i+1} = hash((h_i, block i))          k = L // block

A lookup hashes the prompt's blocks once (O(len(prompt))), walks its chain from the longest k down, and checks
every entry of each bucket *exactly* (``prompt[:L] == context``), so a hash collision can never produce a match.
The index holds references only; its owner (``ChatSessions``) bounds how many entries and tokens it keeps.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
SEED = 0x5E55_1017
DEFAULT_BLOCK = 16


class TokenPrefixIndex(Generic[T]):
    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be an int >= 1, got {block!r}")
        self.block = block
        self._buckets: dict[int, list[tuple[T, list[int]]]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _chain(self, tokens: list[int], num_blocks: int) -> list[int]:
        """h_0 .. h_num_blocks of ``tokens``."""
        hashes = [SEED]
        for i in range(num_blocks):
            hashes.append(hash((hashes[-1], tuple(tokens[i * self.block:(i + 1) * self.block]))))
        return hashes

    def add(self, entry: T, context: list[int]) -> int:
        """Index ``entry`` under ``context`` (kept by reference: do not mutate it while indexed); -> its key.
        Entries are told apart by identity (``remove``)."""
        key = self._chain(context, len(context) // self.block)[-1]
        self._buckets.setdefault(key, []).append((entry, context))
        return key

    def remove(self, entry: T, key: int) -> None:
        bucket = self._buckets.get(key, [])
        bucket[:] = [(e, c) for e, c in bucket if e is not entry]
        if not bucket:
            self._buckets.pop(key, None)

    def prefixes_of(self, tokens: list[int]) -> Iterator[tuple[T, list[int]]]:
        """(entry, context) for every entry whose context is a prefix of ``tokens`` (equal included), longest
        first; among equal lengths, the most recently added first."""
        hashes = self._chain(tokens, len(tokens) // self.block)
        seen: set[int] = set()
        for key in reversed(hashes):
            bucket = self._buckets.get(key)
            if not bucket or key in seen:     # a repeated key (a collision) holds the same entries
                continue
            seen.add(key)
            found = [(e, c) for e, c in reversed(bucket) if len(c) <= len(tokens) and tokens[:len(c)] == c]
            found.sort(key=lambda ec: -len(ec[1]))       # stable: recency kept among equal lengths
            yield from found
