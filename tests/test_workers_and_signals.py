"""DataLoader workers that hang or die give one line; a SIGUSR1 is kept until a stage consumes it."""
import gc
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from distributed import REPO, env, tiny_recipe, write_corpus

from ernie_tiny_ds.config import DataConfig
from ernie_tiny_ds.data import corpus
from ernie_tiny_ds.data.corpus import StreamingCorpusLoader, describe_worker_failure
from ernie_tiny_ds.errors import DataError
from ernie_tiny_ds.runtime import stop


def loader(tmp_path, wordpiece, workers=1):
    cfg = DataConfig(corpus=str(write_corpus(tmp_path / "corpus", documents=400)), max_seq_len=32,
                     shuffle_buffer=8, num_workers=workers)
    return StreamingCorpusLoader(cfg, wordpiece, 2, 0, 1, seed=0)


def failure_line(batches, fault) -> str:
    """Inject `fault`, iterate until the loader fails, and return the line the user sees. torch's
    SIGCHLD handler can raise a worker's death anywhere in the main thread; the CLI then asks
    describe_worker_failure, as this does."""
    try:
        fault()
        for _ in range(10_000):
            next(batches)
            time.sleep(0.01)
    except DataError as exc:
        return str(exc)
    except RuntimeError as exc:
        return describe_worker_failure(exc, 0) or f"undiagnosed: {exc}"
    finally:
        batches.close()  # shuts the DataLoader's workers down and unregisters them from torch's handler
        gc.collect()
    raise AssertionError("the loader never failed")


@pytest.mark.slow  # waits out a worker timeout: over the quick tier's 3 s
def test_a_worker_that_hangs_is_named_after_the_worker_timeout(tmp_path, wordpiece, monkeypatch):
    monkeypatch.setattr(corpus, "WORKER_TIMEOUT_S", 3.0)
    hang = tmp_path / "hang"
    real = corpus.SequenceStream.next_batch

    def next_batch(self, *args, **kwargs):  # the forked worker inherits this: a read that never returns
        while hang.exists():
            time.sleep(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(corpus.SequenceStream, "next_batch", next_batch)
    batches = iter(loader(tmp_path, wordpiece))
    next(batches)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(AssertionError("no worker timeout: hung")))
    signal.alarm(60)
    try:
        line = failure_line(batches, hang.touch)
    finally:
        signal.alarm(0)
        hang.unlink()
    assert re.search(r"data.num_workers: a DataLoader worker of rank 0 gave no batch for 3 s", line), line


def test_a_killed_worker_is_one_line(tmp_path, wordpiece):
    batches = iter(loader(tmp_path, wordpiece))
    next(batches)
    (worker,) = multiprocessing.active_children()
    line = failure_line(batches, lambda: os.kill(worker.pid, signal.SIGKILL))  # what the OOM killer does
    assert re.search(rf"a DataLoader worker of rank 0 \(pid {worker.pid}\) ended \((killed by signal Killed|it exited "
                     r"unexpectedly), most likely the out-of-memory killer\)", line), line


@pytest.mark.slow
def test_a_killed_worker_during_distillation_is_one_line_and_no_traceback(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, data={"num_workers": 1},
                         train={"max_steps": 100000, "save_every": 100000})
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ernie_tiny_ds.cli", "distill",
                             "--config", str(recipe), "--stage", "general"], env=env(), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        metrics = tmp_path / "out/general/metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, open(tmp_path / "log.txt").read()[-3000:]
            time.sleep(0.5)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert children, "no DataLoader worker found"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = open(tmp_path / "log.txt").read()
    assert code != 0
    assert re.search(r"error: data.num_workers: a DataLoader worker of rank 0 \(pid \d+\) ended", out), out[-3000:]
    assert "Traceback" not in out


# --------------------------------------------------------------------------- SIGUSR1 between stages
def test_a_signal_between_two_stages_is_kept_until_a_stage_consumes_it(tmp_path):
    stop.install()
    first_stage = stop.StopRequest(tmp_path)
    assert not first_stage.requested()
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives after stage 1's last check, during its export
    time.sleep(0.1)
    next_stage = stop.StopRequest(tmp_path)  # what the next stage makes
    assert next_stage.requested()  # old code: the flag lived on stage 1's object and was lost
    assert not next_stage.requested()  # consumed: it stops one stage, not every later one


def test_a_stop_file_stays_until_cleared(tmp_path):
    request = stop.StopRequest(tmp_path)
    (tmp_path / stop.STOP_FILE).write_text("")
    assert request.requested() and request.requested()
    request.clear()
    assert not request.requested()
