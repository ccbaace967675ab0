"""How several token vocabularies share one embedding table.

A stage sees tokens of several kinds (MuLan RVQ levels, semantic tokens, codec levels). Each kind is a
*group* of `levels` codebooks of `codebook_size` codes; every (group, level) pair gets its own id range in one
table, after the special id 0 (PAD, also fed as BOS at the first decoder position):

    global_id = offset(group) + level * codebook_size + code          (code in [0, codebook_size))

Inside a sequence a group's tokens are frame-major: token j of a group belongs to level j % levels (so codec
levels 1-4 of frame 0, then of frame 1, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PAD_ID = 0
NUM_SPECIAL_IDS = 1


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """`levels` codebooks of `codebook_size` codes, e.g. TokenGroup('coarse', 4, 1024)."""

    name: str
    levels: int
    codebook_size: int


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """The groups of one stage, in table order. Build with TokenLayout.from_tuples((('mulan', 12, 1024), ...))."""

    groups: tuple[TokenGroup, ...]

    def __post_init__(self):
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"TokenLayout has repeated group names: {names}")
        for g in self.groups:
            if g.levels < 1 or g.codebook_size < 1:
                raise ValueError(f"TokenLayout group {g}: levels and codebook_size must be positive")

    @classmethod
    def from_tuples(cls, groups: Sequence[Sequence]) -> "TokenLayout":
        return cls(tuple(TokenGroup(str(n), int(l), int(s)) for n, l, s in groups))

    def group(self, name: str) -> TokenGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no token group {name!r} in the layout; groups: {[g.name for g in self.groups]}")

    def offset(self, name: str) -> int:
        """First global id of group `name`."""
        offset = NUM_SPECIAL_IDS
        for g in self.groups:
            if g.name == name:
                return offset
            offset += g.levels * g.codebook_size
        raise KeyError(f"no token group {name!r} in the layout; groups: {[g.name for g in self.groups]}")

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: specials plus every (group, level) range."""
        return NUM_SPECIAL_IDS + sum(g.levels * g.codebook_size for g in self.groups)

    def id_range(self, name: str) -> tuple[int, int]:
        """[low, high): the global ids of group `name`, all levels."""
        g, offset = self.group(name), self.offset(name)
        return offset, offset + g.levels * g.codebook_size

    def level_ranges(self, name: str) -> np.ndarray:
        """[levels, 2] int32: the [low, high) global id range of each level of group `name`."""
        g, offset = self.group(name), self.offset(name)
        lows = offset + np.arange(g.levels) * g.codebook_size
        return np.stack([lows, lows + g.codebook_size], axis=1).astype(np.int32)

    def to_global(self, codes, name: str, first_level: int = 0):
        """codes [..., n] (codes of group `name`, frame-major levels starting at `first_level`) -> global ids."""
        g = self.group(name)
        codes = np.asarray(codes) if not hasattr(codes, "dtype") else codes
        level = (np.arange(codes.shape[-1]) + first_level) % g.levels
        return codes + self.offset(name) + level * g.codebook_size

    def to_local(self, ids, name: str, first_level: int = 0):
        """Inverse of to_global: global ids [..., n] of group `name` -> codes in [0, codebook_size)."""
        g = self.group(name)
        level = (np.arange(ids.shape[-1]) + first_level) % g.levels
        return ids - self.offset(name) - level * g.codebook_size
