"""A DeepSpeed op build that was killed leaves its lock behind, and every later job would wait on it forever.

DeepSpeed JIT-builds C++ ops on first use (on CPU the shared-memory all-reduce, at init_distributed)
through torch's cpp_extension, which guards each build folder with a `lock` file: whoever finds the
file waits, without a timeout and without a word, until it disappears. A Ctrl-C or a kill during the
build (about 30 s the first time) leaves it, and the next run hangs before its first line. A build
that is really running refreshes nothing, but none takes minutes: a lock much older than the longest
build is a dead one, removed here, with one line that says so.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root

# a cold build of the largest op here takes about 45 s on an idle 2-core VM and a few minutes when
# the machine is crowded; a lock three times older than the worst of those is no build's
STALE_AFTER_S = 15 * 60


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its cache folder (one level of
    py<version>_<cuda> below it, which the glob covers)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])

    return Path(get_default_build_root())


def remove_stale_build_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove build locks under `root` (default: torch's extensions folder) older than `stale_after_s`."""
    root = extensions_root() if root is None else Path(root)
    removed = []
    now = time.time()
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        with contextlib.suppress(OSError):  # another rank of this node may remove it first
            age = now - lock.stat().st_mtime
            if age > stale_after_s:
                lock.unlink()
                removed.append(lock)
                print(f"warning: removed {lock}, a build lock {age / 60:.0f} minutes old: a DeepSpeed op build "
                      f"was killed before it finished, and this job would have waited on it forever",
                      file=sys.stderr, flush=True)
    return removed
