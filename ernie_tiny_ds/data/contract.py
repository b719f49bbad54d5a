"""The contract every training-data loader keeps with the training loop.

  * iterating yields endless batches {input_ids, attention_mask, token_type_ids[, labels]} of [B, L]
    int64 tensors, epoch after epoch;
  * each rank (and each dataloader worker) reads a disjoint share of the data;
  * state_dict() / load_state_dict() restore the exact position, so a restarted run continues with
    the batch it would have seen next; the state is plain Python (ints, str, lists, dicts) and
    load_state_dict refuses, naming the setting, a position saved by a loader that reads otherwise.

Implemented by StreamingCorpusLoader (data.corpus), ShardLoader (data.indexed) and TaskLoader
(data.tasks); the loaders of a finite data set also tell `batches_per_epoch`.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch

from ..errors import DataError

STATE_VERSION = 1


@runtime_checkable
class BatchLoader(Protocol):
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def loader_state(source: str, **fields) -> dict:
    """A saved position: the contract's version, which loader wrote it, and what it needs to resume."""
    return {"version": STATE_VERSION, "source": source, **fields}


def check_state(state: dict, source: str, **same) -> None:
    """A saved position only fits a loader reading the same way; say which setting differs."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DataError("the checkpoint's data position is from another loader version; it cannot be resumed")
    if state.get("source") != source:
        raise DataError(f"the checkpoint's data position is for a {state.get('source')} loader, this run reads "
                        f"with a {source} loader (data.source / stage data differ)")
    for key, value in same.items():
        if state.get(key) != value:
            raise DataError(f"the checkpoint's data position was saved with {key}={state.get(key)}, "
                            f"this run has {key}={value}; resume with the same setting")
