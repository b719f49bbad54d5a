"""Durable writes: anything a later run trusts (checkpoint, export, marker, report) is written to a
temporary name, fsynced, renamed into place, and its folder fsynced, so that after a crash or a
power loss the name holds either the old content or the complete new one.

Temporary names are made exclusively (O_EXCL, random suffix, never following a planted symlink) in
the destination's own folder, so the final rename stays on one filesystem.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from .errors import UserError


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder` (what a library wrote without syncing)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import: os.umask can only be read by setting it


def temp_file_beside(path: str | os.PathLike, prefix: str | None = None) -> tuple[int, str]:
    """(fd, name) of a new, exclusively created file next to `path`. mkstemp makes it 0600; what
    replaces `path` gets the permissions a plain open would give (0666 less the umask), so that
    exports and reports stay readable by whoever could read the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `write(handle)` on an exclusive temporary file, then fsync and rename."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def replaced_atomically(output: Path) -> Iterator[Path]:
    """A temp path beside `output` for a library that writes only by file name (an ONNX exporter, a
    quantiser). When the block ends without an error the file is synced and renamed over `output`, its
    folder synced: a reader sees the old file or the whole new one, never half of one."""
    # an exclusive temp file (mkstemp): a predictable name could be a planted symlink the writer writes through
    handle, name = temp_file_beside(output)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:  # on disk before the rename, the rename on disk before we return
            os.fsync(written.fileno())
        os.replace(tmp, output)
        fsync_dir(output.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return write_atomic(path, lambda handle: torch.save(obj, handle))


def temp_dir_beside(path: str | os.PathLike, prefix: str | None = None) -> Path:
    """A new, exclusively created folder next to `path`, for building what will replace it (0777 less
    the umask, as mkdir gives, not mkdtemp's 0700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp"))
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def plain_file_modes(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the permissions a plain open gives (0666 less the umask): some
    writers make theirs 0600 (transformers' safetensors shards), and an export must stay readable by
    whoever can read its folder."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~_UMASK)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temporary files and folders an earlier, interrupted write of `path` left beside it
    (a crash, a full disk): nothing trusts them and they only fill the disk. Call it before a new
    write of `path` starts; a symlink is unlinked, never followed. Only under the job's lock
    (outputs.exclusive): without it, a temporary could be a live job's write in progress."""
    from .outputs import under_lock

    path = Path(path)
    if not path.parent.is_dir() or not under_lock(path):
        return
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if stale.is_symlink() or not stale.is_dir():
            stale.unlink(missing_ok=True)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished folder into place durably: its files synced, the old folder (if any) set
    aside and removed only after the new one is in place, the parent synced."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = temp_dir_beside(final)
        os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the old folder back: a failed replace must not leave nothing
            os.replace(old / final.name, final)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- a full disk
def is_disk_full(exc: BaseException, folder: Path, needed: int | None) -> bool:
    """Whether `exc`, raised while writing under `folder`, means the disk (or the quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save ("file write failed", a RuntimeError) and safetensors (its own error class, the OS's words
    # inside) report a full disk without an errno: taken as one only where the disk has less room than needed
    text = str(exc)
    if isinstance(exc, Exception) and ("write failed" in text or "No space left" in text):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return False
        return needed is None or free < needed
    return False


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def disk_full_is_one_line(folder: Path, needs: Callable[[], tuple[int | None, str]], advice: str,
                          partial: Path | None = None) -> Iterator[None]:
    """A full disk while writing under `folder`: one line (a UserError) naming the disk (the folder), its free
    bytes and about how many the write needs, instead of a traceback. `needs()`, asked only after an error,
    gives (bytes or None, the words saying so); `partial`, what the failed write leaves, is removed first."""
    try:
        yield
    except Exception as exc:
        needed, words = needs()
        if not is_disk_full(exc, folder, needed):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"no space left on the disk holding {folder} ({_free_space(folder)}): {words}; {advice}") \
            from None


def weights_disk_full_is_one_line(output: Path, model) -> contextlib.AbstractContextManager:
    """disk_full_is_one_line for a model folder at `output`: its weights need about their size in memory
    (the caller removes its temporary folder)."""
    output = Path(output)

    def needs() -> tuple[int, str]:
        needed = sum(p.numel() * p.element_size() for p in model.parameters())
        return needed, f"the weights of {output.name} need about {needed:,} bytes"
    return disk_full_is_one_line(output.parent, needs, "free space there or write elsewhere")
