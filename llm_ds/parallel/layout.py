"""Where a rank sits among tensor-parallel and data-parallel ranks.

DeepSpeed's AutoTP builds its groups from a (data, tensor) mesh: rank = data_rank x tensor + tensor_rank, so
the ranks of one tensor group are neighbours, on one node when ``parallel.tensor`` divides the ranks per node.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """One rank's place: ``tensor`` ranks split each replica's layers; ``data_size`` replicas read their own
    share of every batch."""

    rank: int
    world_size: int
    tensor: int = 1

    def __post_init__(self):
        if self.world_size % self.tensor:
            raise ValueError(f"parallel.tensor={self.tensor} does not divide the world size of {self.world_size}")

    @property
    def data_size(self) -> int:
        return self.world_size // self.tensor

    @property
    def data_rank(self) -> int:
        return self.rank // self.tensor

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor
