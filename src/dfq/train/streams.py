"""The batch's noise streams: one per shard, so that a run draws the same images on any number of processes."""

from __future__ import annotations

import torch

from dfq.distributed import DistContext, check_shards, shard_seed

__all__ = ["NoiseStreams"]


class NoiseStreams:
    """This rank's shards of the batch, each drawn from its own stream (seeded from the run's seed and the
    shard's index). Drawn on the CPU, so that the images do not depend on the device."""

    def __init__(self, seed: int, shards: int, batch_size: int, dist: DistContext) -> None:
        check_shards(batch_size, shards, dist.world_size)
        own = shards // dist.world_size
        self.shards, self.per_shard, self.dist = shards, batch_size // shards, dist
        self.generators = {
            k: torch.Generator().manual_seed(shard_seed(seed, k)) for k in range(dist.rank * own, (dist.rank + 1) * own)
        }

    def draw(self, latent_dim: int, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise for this rank's shards, and labels when ``num_classes`` is given (a conditional generator)."""
        zs, ys = [], []
        for gen in self.generators.values():
            zs.append(torch.randn(self.per_shard, latent_dim, generator=gen))
            if num_classes is not None:
                ys.append(torch.randint(num_classes, (self.per_shard,), generator=gen))
        z = torch.cat(zs).to(self.dist.device)
        return z, torch.cat(ys).to(self.dist.device) if ys else None

    def state(self) -> torch.Tensor:
        """Every shard's stream state, gathered from the ranks: (shards, state bytes)."""
        states: dict[int, torch.Tensor] = {}
        for part in self.dist.gather_objects({k: g.get_state() for k, g in self.generators.items()}):
            states.update(part)
        return torch.stack([states[k] for k in range(self.shards)])

    def load_state(self, saved: torch.Tensor) -> None:
        states = stream_states(saved)
        for k, gen in self.generators.items():
            gen.set_state(states[k].clone())  # a view of the stacked states crashes set_state


def stream_states(saved: torch.Tensor) -> torch.Tensor:
    """Saved stream states as (shards, bytes); checkpoints of one stream hold a single state."""
    return saved[None] if saved.dim() == 1 else saved
