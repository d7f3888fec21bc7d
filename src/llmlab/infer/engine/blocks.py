"""The KV block pool: fixed-size blocks, reference counts, reservations and the prefix cache.

Memory for keys and values is a pool of blocks of `block_size` token slots (PagedAttention, Kwon et al.
2023); a request holds a block table (its list of block ids) instead of one contiguous region, so requests of
any length share the pool without fragmentation. This module does the bookkeeping only; the tensors live in
paged.py.

Reservations: a request is admitted only when the pool can supply every block it may need (prompt plus
max_tokens), and the blocks it has not taken yet are reserved. Blocks are then taken as the request grows, so
a running request never waits for memory and nothing is ever preempted.

Prefix cache: a full block is keyed by a hash chain over the token ids of its request up to and including the
block (key_i = H(key_{i-1} || tokens of block i)), so equal keys mean equal prefixes and hence equal keys and
values. A request whose prompt starts with cached blocks shares them (reference count + 1) and prefills only
the rest. A block whose count drops to 0 stays cached but evictable; allocation takes never-cached free blocks
first, then evicts the least recently released cached block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0  # never handed out: padding reads and writes go there (masked; it only holds finite values)


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block whose predecessor's key is `parent` (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Block ids 1..num_blocks-1 (0 is the null block) with reference counts and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(1, num_blocks))
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}
        self.by_key: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.reserved = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        """Blocks referenced by some request."""
        return self.capacity - len(self.free) - len(self.evictable)

    def available(self) -> int:
        """Blocks a new reservation may claim."""
        return len(self.free) + len(self.evictable) - self.reserved

    # ----- prefix cache -----
    def cached_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of the chain `keys`."""
        blocks = []
        for key in keys:
            block = self.by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, block: int, key: bytes) -> None:
        """Cache a full, written block under `key` (kept private if another block already holds the key)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every cached key (after the weights change); unreferenced cached blocks become free."""
        self.free.extend(self.evictable)
        self.evictable.clear()
        self.by_key.clear()
        self.key_of.clear()

    # ----- admission and growth -----
    def can_admit(self, new_blocks: int, shared: Sequence[int]) -> bool:
        """Whether `new_blocks` can be reserved after sharing the cached blocks `shared`."""
        revived = sum(1 for b in shared if self.refs[b] == 0)  # sharing takes them off the evictable list
        return new_blocks + revived <= self.available()

    def admit(self, new_blocks: int, shared: Sequence[int]) -> None:
        self.share(shared)
        self.reserved += new_blocks

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of these cached blocks."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1

    def take(self) -> int:
        """One reserved block: a free one, else the least recently released cached one (its key dropped)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
        self.reserved -= 1
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int], unused_reservation: int) -> None:
        """Drop a request's references and the reservation it did not use."""
        self.reserved -= unused_reservation
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
