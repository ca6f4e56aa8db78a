"""Where a rank sits among tensor-parallel, pipeline and data-parallel ranks.

DeepSpeed's AutoTP builds its groups from a (data, tensor) mesh: rank = data_rank x tensor + tensor_rank, so
the ranks of one tensor group are neighbours, on one node when ``parallel.tensor`` divides the ranks per node.
Its pipeline engine lays ranks out as (pipe, data): rank = stage x data-parallel size + data_rank, so a stage's
ranks are neighbours and consecutive stages are a data-parallel size apart (on another node, where the
stages span nodes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """One rank's place: ``tensor`` ranks split each layer, ``pipeline`` stages split the layers, and
    ``data_size`` replicas read their own share of every batch."""

    rank: int
    world_size: int
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self):
        if self.world_size % (self.tensor * self.pipeline):
            raise ValueError(
                f"parallel.tensor={self.tensor} x parallel.pipeline={self.pipeline} does not divide the world size "
                f"of {self.world_size}"
            )

    @property
    def data_size(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def data_rank(self) -> int:
        if self.pipeline > 1:
            return self.rank % self.data_size
        return self.rank // self.tensor

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def stage(self) -> int:
        return self.rank // self.data_size if self.pipeline > 1 else 0

    @property
    def counts_tokens(self) -> bool:
        """One rank of each replica counts the tokens it trains on: the first stage's, tensor rank 0."""
        return self.tensor_rank == 0 and self.stage == 0


def stage_blocks(n_layer: int, stages: int, head: float) -> list[int]:
    """Blocks per pipeline stage, balancing compute: the last stage also runs the output head and the loss,
    worth ``head`` blocks, so it takes fewer blocks; the others share the rest evenly (earlier stages take
    any extra one). Every stage holds at least one block."""
    if stages == 1:
        return [n_layer]
    rest = stages - 1

    def load(last: int) -> tuple[float, int]:
        return max(-(-(n_layer - last) // rest), last + head), -last

    last = min(range(1, n_layer - rest + 1), key=load)
    share, extra = divmod(n_layer - last, rest)
    return [share + (i < extra) for i in range(rest)] + [last]


def head_blocks(vocab: int, n_embd: int, seq: int) -> float:
    """GPT-2's output head and loss in blocks' worth of training FLOPs per token (a block: 6 x (12d² + 13d)
    + 12dT, the head 6Vd): what the last pipeline stage runs besides its blocks."""
    d = n_embd
    return 6 * vocab * d / (6 * (12 * d * d + 13 * d) + 12 * d * seq)
