"""What a command may write over, and one job per output folder.

Every output this tool writes as a folder carries a marker, MARKER ({"kind", "tool_version",
"created"}). An existing output is replaced or reused only when its marker names the same kind;
whatever else is in the way (a teacher, a classifier, a user's notes) is refused in one line and left
alone, because nothing else can tell a folder this tool may delete from one a user brought. An output
that is, contains or lies inside an input of the same command is refused even with --overwrite:
paths are compared after resolving symlinks, so a link cannot hide the overlap.

A job that works in an output_dir (distill, pipeline) holds an exclusive flock on OUT/.lock for
its whole life, taken by global rank 0 only; the OS drops it when the process ends, however it ends,
so a lock file left by a killed job never blocks. The holder writes its host and pid into the file,
and a second job names them. Cleanup of what a crashed job left (checkpoint `.partial` folders,
temporaries beside an export) runs only under such a lock: then no live job can own those leftovers.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping

from . import __version__
from .errors import UserError
from .files import atomic_write_text
from .stages import STAGES

MARKER = ".ernie-tiny-ds.json"
LOCK_FILE = ".lock"
OUTPUT_DIR = "output_dir"  # the kind of a distill/pipeline output_dir (both write the same layout)

_held: dict[Path, tuple[int, str | None]] = {}  # lock file -> (fd, name it covers; None: the whole folder)


# --------------------------------------------------------------------------- markers
def marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind this tool recorded in `folder`, or None when it did not write the folder."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def write_marker(folder: str | os.PathLike, kind: str) -> Path:
    return atomic_write_text(Path(folder) / MARKER, json.dumps(
        {"kind": kind, "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


# --------------------------------------------------------------------------- overlap with inputs
def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _input_root(value: str) -> Path | None:
    """The folder or file an input names; for a glob, the folder above its first wildcard."""
    if glob.has_magic(value):
        parts = Path(value).parts
        static = [p for p in parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
        return _real(Path(*static)) if static else _real(".")
    return _real(value) if os.path.lexists(value) else None  # a Hub ID or a missing path holds nothing


def check_apart_from_inputs(output: str | os.PathLike, flag: str, inputs: Mapping[str, str | None],
                            allow_inputs_inside: bool = False) -> None:
    """Refuse an output that is, contains or lies inside an input (`inputs`: the key naming it -> path)."""
    out = _real(output)
    for key, value in inputs.items():
        if not value:
            continue
        source = _input_root(str(value))
        if source is None:
            continue
        if out == source:
            relation = "is"
        elif out in source.parents:
            if allow_inputs_inside:
                continue
            relation = "contains"
        elif source in out.parents:
            relation = "lies inside"
        else:
            continue
        raise UserError(f"{flag} {output} {relation} the input {key} ({value}); an output never overlaps an "
                        "input of the same command: name another output")


def _check_not_precious(output: Path, flag: str) -> None:
    """Never the current folder, one above it, the home folder or the filesystem root."""
    resolved = _real(output)
    cwd = _real(Path.cwd())
    guarded = {cwd: "the current folder", _real(Path.home()): "your home folder",
               Path(resolved.anchor): "the filesystem root"}
    guarded.update({parent: "a folder above the current one" for parent in cwd.parents if parent not in guarded})
    if resolved in guarded:
        raise UserError(f"{flag} {output}: refusing to replace {guarded[resolved]}; name a new folder")


# --------------------------------------------------------------------------- claims
def claim_output(output: str | os.PathLike, kind: str, flag: str, inputs: Mapping[str, str | None] | None = None,
                 overwrite: bool | None = None) -> Path:
    """Check, before any work, that the folder `output` may be written as `kind`: it overlaps no input,
    and it is new, empty, or marked by this tool as `kind`. `overwrite`: None for a command without
    --overwrite (a marked folder is reused), else whether --overwrite was given (required to replace
    a marked folder)."""
    path = Path(output)
    _check_not_precious(path, flag)
    check_apart_from_inputs(path, flag, inputs or {})
    _check_writable(path if path.is_dir() else path.parent, f"{flag} {output}")
    if holds_nothing(path):
        return path
    if not path.is_dir() or path.is_symlink():
        what = "a symlink" if path.is_symlink() else "a file"
        raise UserError(f"{flag} {output} is {what}, not a folder; name a new folder")
    found = marker_kind(path)
    if found != kind:
        written = f"was written by ernie-tiny-ds as {found}" if found else \
            f"was not written by ernie-tiny-ds (no {MARKER})"
        raise UserError(f"{flag} {output} exists and {written}; it is never replaced by this command's output "
                        f"({kind}): remove it yourself or name a new folder")
    if overwrite is False:
        raise UserError(f"{flag} {output} already holds this command's earlier output ({kind}); pass --overwrite "
                        "to replace it")
    return path


def claim_file(output: str | os.PathLike, flag: str, inputs: Mapping[str, str | None] | None = None,
               home: str | os.PathLike | None = None) -> Path:
    """A single output file (a report, a graph, a task file): never a folder, never an input, never
    inside a folder input. `home`: a folder input the file is written into by design (onnx writes
    MODEL/model.onnx), where only a new file or an earlier .onnx graph may be written. An existing
    file elsewhere is replaced: naming a file as the output asks for it."""
    path = Path(output)
    home_real = _real(home) if home is not None else None
    writes_into_home = home_real is not None and home_real in _real(path).parents and (
        not os.path.lexists(path) or path.suffix == ".onnx")
    if writes_into_home:
        inputs = {k: v for k, v in (inputs or {}).items() if v is None or _input_root(str(v)) != home_real}
    check_apart_from_inputs(path, flag, inputs or {})
    if path.is_dir():
        raise UserError(f"{flag} {output} is a folder; name a file")
    _check_writable(path.parent, f"{flag} {output}")
    return path


def _check_writable(folder: Path, subject: str) -> None:
    """The nearest existing folder on the way to `folder` must be a folder this process can write to."""
    existing = Path(os.path.abspath(folder))
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{subject}: {existing} is a file, not a folder; name a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UserError(f"{subject}: {existing} is not writable; name a folder you can write to")


def holds_nothing(path: str | os.PathLike) -> bool:
    """Whether `path` is missing or an empty folder (this tool's lock files and marker, and a STOP, aside)."""
    path = Path(path)
    return not os.path.lexists(path) or (path.is_dir() and not path.is_symlink() and not _contents(path))


def _contents(folder: Path) -> list[str]:
    """What is in `folder` besides this tool's lock files and marker (written first by a starting job)
    and a STOP request (which a user may place before the job starts)."""
    return [name for name in os.listdir(folder)
            if not (name in (LOCK_FILE, "STOP") or (name.startswith(".") and name.endswith(".lock"))
                    or name.startswith((MARKER, f".{MARKER}")))]


def _legacy_layout(folder: Path) -> bool:
    """An output_dir written before markers existed: it holds a folder of this project's layout (a stage,
    the finetuned teacher or its checkpoints) or pipeline_done.json. It is adopted: marked on this run."""
    known = [*STAGES, "teacher_finetuned", "teacher_finetuned.checkpoints"]
    return (folder / "pipeline_done.json").is_file() or any((folder / name).is_dir() for name in known)


def claim_output_dir(output_dir: str | os.PathLike, inputs: Mapping[str, str | None], key: str = "output_dir") -> Path:
    """Check that output_dir may hold this distill/pipeline job: not an input, not inside one, and new,
    empty, marked as an output_dir or in the project's own layout (what the same job reuses on resume).
    `key`: what names the folder in an error (a student's folder is named by its students[i].name)."""
    path = Path(output_dir)
    _check_not_precious(path, key)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{key} {output_dir} is a file, not a folder; name a folder")
    _check_writable(path, f"{key} {output_dir}")
    ours = path.is_dir() and (marker_kind(path) == OUTPUT_DIR or _legacy_layout(path))
    # inputs inside our own output_dir are the earlier stages' exports (student.path=OUT/general/student)
    check_apart_from_inputs(path, key, inputs, allow_inputs_inside=ours)
    if path.is_dir() and not ours and _contents(path):
        found = marker_kind(path)
        written = f"was written by ernie-tiny-ds as {found}" if found else \
            f"was not written by ernie-tiny-ds (no {MARKER}, no stage folders)"
        raise UserError(f"{key} {output_dir} is not empty and {written}; name a new or empty folder")
    return path


def task_inputs(task) -> dict[str, str | None]:
    """The files (or local dataset) a task section reads, by the key naming each."""
    return {"task.train_file": task.train_file, "task.augmented_train_file": task.augmented_train_file,
            "task.dev_file": task.dev_file, "task.test_file": task.test_file, "task.dataset": task.dataset}


def recipe_inputs(recipe, leave_out: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Every path a distill/pipeline job reads, by the recipe key naming it; `leave_out`: the keys that
    name what the command writes (finetune-teacher's teacher.finetuned_path, augment's augmented file)."""
    paths = {"teacher.path": recipe.teacher.path, "teacher.finetuned_path": recipe.teacher.finetuned_path,
            "student.path": recipe.student.path, "student.projections": recipe.student.projections,
            "data.corpus": recipe.data.corpus, "data.tokenizer": recipe.data.tokenizer,
            "augment.mlm_model": recipe.augment.mlm_model, **task_inputs(recipe.task)}
    return {key: value for key, value in paths.items() if key not in leave_out}


@contextlib.contextmanager
def output_dir_job(recipe) -> Iterator[Path]:
    """A distill/pipeline (or default finetune-teacher) job in recipe.output_dir: checked against the
    recipe's inputs on every rank before any work, then locked and marked by global rank 0."""
    inputs = recipe_inputs(recipe)
    out = claim_output_dir(recipe.output_dir, inputs)
    for i, shape in enumerate(recipe.students):
        # each student's folder OUT/<name> is an output_dir of its own (its stages, then its task pipeline):
        # a user's folder inside a reused OUT is neither written into nor made a student's
        claim_output_dir(out / shape.name, inputs, key=f"students[{i}].name: {shape.name!r}:")
    with exclusive(out):
        if os.environ.get("RANK", "0") == "0" and marker_kind(out) != OUTPUT_DIR:
            write_marker(out, OUTPUT_DIR)
        yield out


# --------------------------------------------------------------------------- one job per folder
def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    return text or "a job that has not yet written its host and pid"


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, name: str | None = None, what: str = "output_dir") -> Iterator[None]:
    """Hold the job's lock for the `with` block: on folder/.lock (name None), or on folder/.NAME.lock for
    the single output folder/NAME and its siblings (NAME.checkpoints, NAME_best). Global rank 0 only;
    other ranks and a process already holding it pass through."""
    folder = Path(folder)
    lock_file = folder / (LOCK_FILE if name is None else f".{name}.lock")
    if os.environ.get("RANK", "0") != "0" or under_lock(folder / (name or "")):
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise UserError(f"{what} {folder}: cannot create {lock_file.name} there ({exc.strerror}); "
                        "name a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        subject = f"{folder / name}" if name else f"{folder}"
        raise UserError(f"{what} {subject} is in use by another job ({_holder(lock_file)}); wait for it to end "
                        "or name another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    os.fsync(fd)
    _held[_real(lock_file)] = (fd, name)
    try:
        yield
    finally:
        del _held[_real(lock_file)]
        os.close(fd)  # closing drops the flock; the file stays, a later job simply locks it again


def under_lock(path: str | os.PathLike) -> bool:
    """Whether this process holds the lock that covers `path` (so what a crash left there is no live job's)."""
    target = _real(path)
    for lock_file, (_fd, name) in _held.items():
        folder = lock_file.parent
        if name is None and (target == folder or folder in target.parents):
            return True
        if name is not None and folder in target.parents:
            first = target.relative_to(folder).parts[0].lstrip(".")  # .NAME.x.tmp: a temporary of NAME
            if first == name or first.startswith((f"{name}.", f"{name}_")):  # NAME.checkpoints, NAME_best
                return True
    return False
