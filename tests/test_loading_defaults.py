"""data.num_workers: auto (the default): no workers on a CPU, DataLoader workers and pinned batches on
CUDA (emulated here: the device a loader is built for, and torch.cuda.is_available for pinning), for
the general corpus and for the task's train batches; an explicit count is kept. Batches made by
workers are the batches made in the training process, and a resume continues exactly, with
workers and without.

The CUDA-only facts (batches really pinned, copied asynchronously) are tests/test_gpu.py's."""
from __future__ import annotations

import pytest
import torch
from corpus_fixtures import write_id_corpus
from test_loader import roundtrip, take
from test_tasks import index_task

from ernie_tiny_ds.config import DataConfig, load_recipe
from ernie_tiny_ds.data import corpus, workers
from ernie_tiny_ds.data.corpus import build_general_loader
from ernie_tiny_ds.data.tasks import TaskLoader, build_task_loader, load_task
from ernie_tiny_ds.data.tokenizer import load_tokenizer
from ernie_tiny_ds.data.workers import Loading
from ernie_tiny_ds.runtime import loop
from ernie_tiny_ds.stages import STAGE_SPECS

CUDA = torch.device("cuda", 0)


@pytest.fixture
def many_cores(monkeypatch):
    """16 cores for one rank (what the worker count reads)."""
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_SIZE", "1")


@pytest.fixture
def cuda_host(many_cores, monkeypatch):
    """... and a CUDA runtime (what pinning reads)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_num_workers_defaults_to_auto_and_resolves_per_device(cuda_host, monkeypatch):
    assert DataConfig().num_workers == "auto"
    assert load_recipe(None, ["teacher.config={}", "data.num_workers=auto"]).data.num_workers == "auto"
    assert Loading.for_device("auto", "cpu") == Loading(0, False)   # the CPU step already uses every core
    assert Loading.for_device("auto", CUDA) == Loading(2, True)
    assert Loading.for_device(3, "cpu") == Loading(3, False)        # pinned only for a CUDA device
    assert Loading.for_device(3, CUDA) == Loading(3, True)
    assert Loading.for_device(0, CUDA) == Loading(0, False)         # nothing pins in the background
    monkeypatch.setenv("LOCAL_SIZE", "8")                           # 8 ranks on 16 cores: one core to spare
    assert Loading.for_device("auto", CUDA) == Loading(1, True)
    monkeypatch.setenv("LOCAL_SIZE", "16")
    assert Loading.for_device("auto", CUDA) == Loading(0, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA device named, no runtime to pin with
    monkeypatch.setenv("LOCAL_SIZE", "1")
    assert Loading.for_device("auto", CUDA) == Loading(2, False)


def test_a_stage_builds_its_loader_with_workers_and_pinned_memory_on_cuda(cuda_host, monkeypatch, tmp_path,
                                                                          tokenizer_dir):
    """What runtime/loop.py hands the general and the task loader on a CUDA rank, with data.num_workers
    unset; the general loader's DataLoader gets the workers and pin_memory (its workers run here, on
    the CPU, so the recording stand-in passes pin_memory on as false)."""
    write_id_corpus(tmp_path / "corpus", documents=40, files=1)
    recipe = load_recipe(None, ["teacher.config={}", f"data.corpus={tmp_path / 'corpus'}", "data.max_seq_len=32",
                                f"task.train_file={index_task(tmp_path, 40).train_file}",
                                "task.text_columns=[sentence]", "task.type=regression", "task.max_seq_len=16"])
    tokenizer = load_tokenizer(tokenizer_dir)
    monkeypatch.setattr(loop, "device", lambda: CUDA)
    general = loop.make_loader(recipe, STAGE_SPECS["general"], tokenizer, 0, 1)
    task = loop.make_loader(recipe, STAGE_SPECS["task_specific"], tokenizer, 0, 1)
    assert general.loading == task.loading == Loading(2, True)
    made = []

    def recording(*args, **kwargs):
        made.append(dict(kwargs))
        return torch.utils.data.DataLoader(*args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(corpus, "DataLoader", recording)
    assert len(take(general, 3)) == 3 and len(take(task, 3)) == 3
    assert [(m["num_workers"], m["pin_memory"]) for m in made] == [(2, True), (2, True)]
    monkeypatch.setattr(loop, "device", lambda: torch.device("cpu"))
    assert loop.make_loader(recipe, STAGE_SPECS["general"], tokenizer, 0, 1).loading == Loading(0, False)
    assert loop.make_loader(recipe, STAGE_SPECS["task_specific"], tokenizer, 0, 1).loading == Loading(0, False)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return load_task(index_task(tmp_path_factory.mktemp("task"), 30))  # 3 batches per epoch on each of 2 ranks


@pytest.mark.parametrize("workers", [0, 2])
def test_task_batches_from_workers_equal_the_training_process_and_resume_exactly(task, tokenizer_dir, workers):
    tokenizer = load_tokenizer(tokenizer_dir)

    def loader(count: int) -> TaskLoader:
        return TaskLoader(task, tokenizer, 4, 1, 2, seed=5, with_labels=True, loading=Loading(count))

    total = 10  # more than three epochs of 3 batches
    inline = take(loader(0), total)
    straight = take(loader(workers), total)
    assert same_batches(straight, inline)
    for stop in (2, 3, 7):  # within an epoch, at its end, in a later one
        first = loader(workers)
        assert same_batches(take(first, stop), inline[:stop])
        state = roundtrip(first.state_dict())
        for resumed_with in (workers, 2 - workers):  # the position does not depend on the workers
            resumed = loader(resumed_with)
            resumed.load_state_dict(state)
            assert same_batches(take(resumed, total - stop), inline[stop:]), (stop, resumed_with)


def test_build_task_loader_passes_the_loading_on(task, tokenizer_dir, tmp_path):
    cfg = index_task(tmp_path, 30)
    built = build_task_loader(cfg, load_tokenizer(tokenizer_dir), 4, 0, 2, 5, with_labels=True,
                              loading=Loading(2, False))
    assert built.loading == Loading(2, False)
    reference = TaskLoader(task, load_tokenizer(tokenizer_dir), 4, 0, 2, seed=5, with_labels=True)
    assert same_batches(take(built, 4), take(reference, 4))


def test_general_corpus_for_cuda_resumes_exactly_with_its_default_workers(wordpiece, tmp_path, many_cores):
    """data.num_workers unset, batches bound for CUDA: 2 workers (no runtime to pin with here); stopped
    and resumed, the batches are those of the uninterrupted run."""
    write_id_corpus(tmp_path / "corpus", documents=30, files=1, seed=3)
    cfg = DataConfig(corpus=str(tmp_path / "corpus"), max_seq_len=32, shuffle_buffer=8)
    build = lambda: build_general_loader(cfg, wordpiece, 3, 1, 2, seed=11, device=CUDA)  # noqa: E731
    assert build().loading == Loading(2, torch.cuda.is_available())
    total = 16
    straight = take(build(), total)
    for stop in (5, 11):
        first = build()
        take(first, stop)
        state = roundtrip(first.state_dict())
        assert state["num_workers"] == 2
        resumed = build()
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, total - stop), straight[stop:]), stop
    assert build_general_loader(cfg, wordpiece, 3, 1, 2, seed=11).loading == Loading(0, False)  # for the CPU


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_draw_nothing_from_the_training_process_rng(task, tokenizer_dir, wordpiece, tmp_path,
                                                                   workers):
    """The training process's torch RNG drives dropout. A DataLoader with workers draws its workers' base
    seed from it unless given a generator of its own, which would shift the dropout stream by where the
    loader was built: a student of a joint stage (runtime/shared_teacher.py) would then differ from its
    solo run on a GPU (workers) though it equals it on CPU (none)."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))  # a fresh state each run
    before = torch.get_rng_state()
    tokenizer = load_tokenizer(tokenizer_dir)
    take(TaskLoader(task, tokenizer, 4, 0, 2, seed=5, with_labels=True, loading=Loading(workers)), 4)
    write_id_corpus(tmp_path / "corpus", documents=30, files=1, seed=3)
    data = DataConfig(corpus=str(tmp_path / "corpus"), max_seq_len=32, shuffle_buffer=8, num_workers=workers)
    take(build_general_loader(data, wordpiece, 3, 1, 2, seed=11), 4)
    assert torch.equal(torch.get_rng_state(), before)
