"""Which documents a consumer (one rank's dataloader worker) reads, deterministically.

Consumers are numbered rank * workers + worker. With at least as many files as consumers each
consumer owns whole files (file i -> consumer i % C); otherwise every consumer reads all files and
keeps every C-th document. Either way each document of an epoch goes to exactly one consumer.
The order of files changes every epoch, seeded by (seed, epoch): no RNG state needs saving.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Consumer:
    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers

    def __str__(self) -> str:
        return f"rank {self.rank} worker {self.worker}"


@dataclass(frozen=True)
class EpochPlan:
    files: list[str]       # what this consumer reads this epoch, in order
    interleave: bool       # True: keep only documents whose running number % count == index


def epoch_plan(sources: list[str], consumer: Consumer, epoch: int, seed: int) -> EpochPlan:
    if len(sources) >= consumer.count:
        mine = [f for i, f in enumerate(sources) if i % consumer.count == consumer.index]
        random.Random(f"files:{seed}:{epoch}:{consumer.index}").shuffle(mine)
        return EpochPlan(mine, interleave=False)
    shared = list(sources)  # the same order for every consumer, so document numbers agree
    random.Random(f"files:{seed}:{epoch}").shuffle(shared)
    return EpochPlan(shared, interleave=consumer.count > 1)
