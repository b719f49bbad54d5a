import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without CUDA the Triton kernels run under the interpreter, which triton picks when a kernel module
# is first imported: set it here, before any test module can import one (whichever runs first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The project's bundled WordPiece tokenizer (real English ids)."""
    from ernie_tiny_ds.assets import DEFAULT_TOKENIZER
    return str(DEFAULT_TOKENIZER)


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory) -> str:
    """A WordPiece tokenizer trained on the id corpus of corpus_fixtures (each token one known word)."""
    from corpus_fixtures import train_wordpiece
    return train_wordpiece(tmp_path_factory.mktemp("wp"))


@pytest.fixture(scope="session")
def wordpiece(wordpiece_dir):
    from corpus_fixtures import load
    return load(wordpiece_dir)


@pytest.fixture(scope="session")
def stage1_stopped_at_step_2(tmp_path_factory, tokenizer_dir, vocab_size):
    """The folder of one stage-1 run stopped at step 2 of 6 (shared_runs.py); read it, never write it:
    a test that resumes or damages it takes `stopped_run` instead."""
    from shared_runs import stage1_stopped_at_step_2 as make
    return make(tmp_path_factory.mktemp("stage1_stopped_at_step_2"), tokenizer_dir, vocab_size)


@pytest.fixture(scope="session")
def stage1_on_two_ranks_stopped_at_step_4(tmp_path_factory, tokenizer_dir, vocab_size):
    """The folder of one 2-rank stage-1 run stopped at step 4 of 6, checkpoints at steps 2 and 4
    (shared_runs.py); read it, never write it: copy it with shared_runs.copy_of_run."""
    from shared_runs import stage1_on_two_ranks_stopped_at_step_4 as make
    return make(tmp_path_factory.mktemp("stage1_on_two_ranks_stopped_at_step_4"), tokenizer_dir, vocab_size)


@pytest.fixture
def stopped_run(stage1_stopped_at_step_2, tmp_path):
    """This test's own copy of that run in tmp_path (out/, recipe.yaml): the copied recipe's path."""
    from shared_runs import copy_of_run
    return copy_of_run(stage1_stopped_at_step_2, tmp_path)


@pytest.fixture(autouse=True, scope="session")
def process_group_outlives_in_process_commands():
    """A command run through cli.main in the pytest process (in_process below, or a test calling
    main directly) leaves its one-process group in place instead of destroying it at the end:
    DeepSpeed keeps the groups it made from it, so once the group is destroyed every later engine
    in this process fails ("Group ... is not registered")."""
    from ernie_tiny_ds import cli
    from ernie_tiny_ds.runtime import rank_registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_shutdown", lambda: rank_registry.stop_watch())
        yield


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`in_process(argv)` runs cli.main in this process and returns (exit code, stderr's non-blank lines):
    the cheap way to check a one-line exit where no process group is needed. The one-line exit
    (os._exit in production, which would end pytest) becomes SystemExit. A command that got as far
    as its one-process group leaves it in place, whether it failed or not, for the next command in
    this process: DeepSpeed keeps the groups it made, so once destroyed none could be made again."""
    from ernie_tiny_ds import cli
    from ernie_tiny_ds.runtime import rank_registry

    def report(line, code=1):
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(code)

    monkeypatch.setattr(rank_registry, "report_and_exit", report)
    # a run without a launcher sets these for its one-process group: restored afterwards
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)

    def run(argv: list[str]) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.strip()]
    return run


def pytest_configure(config):
    import process_count
    config.pluginmanager.register(process_count, "process_count")


def pytest_collection_modifyitems(config, items):
    """Whole files, in the order tests/run.sh's two workers take them (--dist loadfile
    --no-loadscope-reorder): first the files with slow tests, those with the fewest tests first, then
    the files of quick tests only, the largest first.

    A slow file of one or two tests is one long end-to-end run (the Slurm job, the shared folder, two
    nodes): started early, the other worker's many short tests fill around it. xdist's own order, the
    largest files first, left those runs for last, where one worker ran them while the other had
    nothing left (the Slurm job ran alone for 60-80 s). Sorting whole files keeps each file's order."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def key(name: str) -> tuple[bool, int]:
        tests = files[name]
        if any(item.get_closest_marker("slow") for item in tests):
            return False, len(tests)
        return True, -len(tests)

    items[:] = [item for name in sorted(files, key=key) for item in files[name]]
