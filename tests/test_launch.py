"""`ernie-tiny-ds launch` and the Slurm script of `submit slurm`: exact arguments (hostile paths included),
clear errors, the environment deepspeed exports over ssh, and two "nodes" training together in no-ssh mode."""
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import REPO, env, free_port, read_metrics, run_cli, tiny_recipe, two_node_launch

HOSTILE = "we ird $HOME `touch pwned`; 'q\" %j"


def in_process(args: list[str], capsys) -> str:
    """Run a sub-command in this process (no interpreter start-up) and return what it printed."""
    from ernie_tiny_ds.cli import parse_args
    parsed = parse_args(args)
    assert parsed.func(parsed) == 0
    return capsys.readouterr().out


def user_error(args: list[str]) -> str:
    from ernie_tiny_ds.cli import parse_args
    from ernie_tiny_ds.errors import UserError
    parsed = parse_args(args)
    with pytest.raises(UserError) as caught:
        parsed.func(parsed)
    return str(caught.value)


def section(text: str, title: str) -> str:
    """The lines after the '# <title>' heading, up to the next '# ' heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# {title}"))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("# "):
            break
        body.append(line)
    return "\n".join(body)


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_pdsh(bin_dir: Path, remote_shell: str, record: str = "") -> Path:
    """ssh and pdsh stood in for: `pdsh -S -f N -w HOST1,HOST2 WORDS...` joins WORDS into the line a
    remote shell would get (%n = host index). For each node, `bash -c REMOTE_SHELL` runs in an empty
    environment, then `record` in the stand-in itself; both see $setup (the runner's exports and cd:
    the line up to the launcher), $remote (the whole line), $launcher and $i (the node index)."""
    executable(bin_dir / "ssh", "#!/bin/sh\nexit 0\n")  # the runner's reachability check
    launcher = f"{sys.executable} -u -m deepspeed.launcher.launch"
    executable(bin_dir / "pdsh", f"""#!/bin/bash
while [ "$1" != "-w" ]; do shift; done
IFS=, read -ra hosts <<<"$2"; shift 2
line="$*"
launcher={shlex.quote(launcher)}
for i in "${{!hosts[@]}}"; do
  remote=${{line//%n/$i}}
  setup=${{remote%%"$launcher"*}}
  env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c {remote_shell}
  {record}
done
""")
    return bin_dir


@pytest.fixture()
def hostile(tmp_path, tokenizer_dir, vocab_size):
    """A recipe whose folder and output_dir carry spaces, $, `, ;, quotes and %."""
    folder = tmp_path / HOSTILE
    recipe = tiny_recipe(folder, tokenizer_dir, vocab_size)
    return recipe, folder / "out"


# --------------------------------------------------------------------------- launch --dry-run
def test_launch_dry_run_command_parses_back_to_the_exact_arguments(tmp_path, hostile, capsys, monkeypatch):
    recipe, out = hostile
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    for key, value in {**env(), "OMP_NUM_THREADS": "3", "NCCL_SOCKET_IFNAME": "eth0"}.items():
        monkeypatch.setenv(key, value)
    sub = ["distill", "--config", str(recipe), "--stage", "general", f"output_dir={out}"]
    printed = in_process(["launch", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "2", "--no-ssh",
                          "--node_rank", "1", "--master_addr", "node-a", "--master_port", "29123", "--dry-run", "--",
                          *sub], capsys)
    argv = shlex.split(section(printed, "command"))
    runner = argv.index("--hostfile")
    assert argv[runner:] == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "2", "--master_addr",
                             "node-a", "--master_port", "29123", "--no_ssh", "--node_rank", "1", "--module",
                             "ernie_tiny_ds.cli", *sub]
    assert Path(argv[0]).name == "deepspeed" or argv[1:3] == ["-m", "deepspeed.launcher.runner"]
    environment = dict(line.split("=", 1) for line in section(printed, "environment").splitlines())
    assert environment["OMP_NUM_THREADS"] == "3" and environment["NCCL_SOCKET_IFNAME"] == "eth0"
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["TORCH_EXTENSIONS_DIR"] == env()["TORCH_EXTENSIONS_DIR"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("args, message", [
    (["--", "distill", "--stage", "general"], "the sub-command distill --stage general is not valid"),
    (["--"], "no sub-command to run"),
    (["--", "submit", "slurm"], "'submit' cannot run on the ranks"),
    (["--no-ssh", "--", "export", "--checkpoint", "c", "--output", "o"], "--no-ssh needs --node_rank"),
    (["--node_rank", "1", "--", "export", "--checkpoint", "c", "--output", "o"], "--node_rank needs --no-ssh"),
    (["--num_nodes", "2", "--", "export", "--checkpoint", "c", "--output", "o"], "give --hostfile"),
    (["--hostfile", "/nonexistent/hosts", "--", "export", "--checkpoint", "c", "--output", "o"],
     "hostfile not found: /nonexistent/hosts"),
    (["--env", "1BAD=x", "--", "export", "--checkpoint", "c", "--output", "o"], "expected KEY=VALUE"),
])
def test_launch_bad_input_is_a_clear_error(args, message):
    assert message in user_error(["launch", "--dry-run", *args])


def test_hostfile_errors_name_the_line_and_the_cli_exits_2(tmp_path, request):
    cli_main = request.getfixturevalue("in_process")  # conftest's: cli.main in this process, exit code and stderr
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots two\n")
    code, lines = cli_main(["launch", "--hostfile", str(hostfile), "--dry-run", "--", "export", "--checkpoint", "c",
                            "--output", "o"])
    assert code == 2, lines
    assert lines == [f"error: {hostfile} line 3: expected 'HOST slots=N', got 'node-b slots two'"]


def test_ssh_launch_refuses_what_the_remote_shell_would_run(tmp_path, hostile):
    recipe, _ = hostile
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    message = user_error(["launch", "--hostfile", str(hostfile), "--master_addr", "node-a", "--dry-run", "--",
                          "distill", "--config", str(recipe)])
    assert "remote shell without quoting" in message and repr(str(recipe)) in message
    assert "--no-ssh" in message  # the way out


@pytest.mark.slow
def test_ssh_launch_exports_the_env_file_to_every_node(tmp_path):
    """The real deepspeed runner in ssh mode, with pdsh and ssh stood in for: each "remote" shell gets the exact
    line the runner hands pdsh, in an empty environment; it runs the exports and `cd`, and records the rest."""
    bin_dir = fake_pdsh(tmp_path / "bin", f'"$setup env > {tmp_path}/env-$i; pwd > {tmp_path}/cwd-$i"',
                        record=f'printf \'%s\\n\' "${{remote#*"$launcher"}}" > {tmp_path}/argv-$i')
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".deepspeed_env").write_text("ETS_FROM_FILE=kept\nOMP_NUM_THREADS=5\n")  # the user's own file
    spaced = str(tmp_path / "a recipe.yaml")
    proc = run_cli(["launch", "--hostfile", str(hostfile), "--num_gpus", "1", "--master_addr", "node-a",
                    "--env", "ETS_PROBE=two words, one=sign", "--", "distill", "--config", spaced],
               cwd=workdir, extra_env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for node in (0, 1):
        got = dict(line.split("=", 1) for line in (tmp_path / f"env-{node}").read_text().splitlines() if "=" in line)
        assert got["ETS_PROBE"] == "two words, one=sign"
        assert got["ETS_FROM_FILE"] == "kept" and got["OMP_NUM_THREADS"] == "5"  # the file beats the shell
        assert got["HF_HUB_OFFLINE"] == "1"
        assert got["TORCH_EXTENSIONS_DIR"] == env()["TORCH_EXTENSIONS_DIR"]
        assert (tmp_path / f"cwd-{node}").read_text().strip() == str(workdir)
        words = shlex.split((tmp_path / f"argv-{node}").read_text())
        assert f"--node_rank={node}" in words and "--master_addr=node-a" in words
        assert "--module" in words and words[-4:] == ["ernie_tiny_ds.cli", "distill", "--config", spaced]


# --------------------------------------------------------------------------- submit slurm --dry-run
def render_dry_run(args: list[str], capsys) -> tuple[str, list[str]]:
    printed = in_process(["submit", "slurm", "--dry-run", *args], capsys)
    script = printed.split("# ---- sbatch command ----")[0].split("\n", 1)[1]
    sbatch = shlex.split(printed.split("# ---- sbatch command ----\n")[1])
    return script, sbatch


def test_slurm_script_delivers_the_exact_arguments_and_runs_none_of_them(tmp_path, hostile, capsys, monkeypatch):
    """Run the rendered script under stand-in srun/scontrol: the launch each node runs gets the exact argv."""
    recipe, out = hostile
    monkeypatch.chdir(REPO)
    sub = ["distill", "--config", str(recipe), "--stage", "general", f"output_dir={out}", "train.max_steps=7"]
    script, sbatch = render_dry_run(["--nodes", "2", "--gpus-per-node", "2", "--partition", "gpu", "--time",
                                     "1-00:00", "--account", "proj", "--gpu-request", "gpus", "--", *sub], capsys)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=2" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=1-00:00" in script
    assert "#SBATCH --account=proj" in script and "#SBATCH --signal=B:USR1@300" in script
    assert "#SBATCH --requeue" in script
    log_dir = out / "slurm"
    assert sbatch[:2] == ["sbatch", "--parsable"]
    assert f"--output={str(log_dir).replace('%', '%%')}/slurm-%j.out" in sbatch
    assert f"--chdir={REPO}" in sbatch and Path(sbatch[-1]).parent == log_dir

    bin_dir = tmp_path / "bin $(touch pwned)"
    record = tmp_path / "record"
    executable(bin_dir / "scontrol", "#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'node-a\\nnode-b\\n'\n")
    # srun: run the task's program on "node 0", as Slurm would on each node
    executable(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec \"$@\"\n")
    fake_python = executable(bin_dir / "python", f"""#!/bin/bash
printf '%s\\0' "$@" > {shlex.quote(str(record))}.argv
while [ $# -gt 0 ]; do [ "$1" = --hostfile ] && cp "$2" {shlex.quote(str(record))}.hosts; shift; done
""")
    script = script.replace(f"PYTHON={shlex.quote(sys.executable)}", f"PYTHON={shlex.quote(str(fake_python))}")
    log_dir.mkdir(parents=True)
    job_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.run(["bash", "-c", script], env=job_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = Path(f"{record}.argv").read_text().split("\0")[:-1]
    hostfile = str(log_dir / "hostfile-4242")
    assert argv == ["-m", "ernie_tiny_ds.cli", "launch", "--no-ssh", "--node_rank", "0", "--hostfile", hostfile,
                    "--num_nodes", "2", "--num_gpus", "2", "--master_addr", "node-a", "--master_port",
                    str(20000 + 4242 % 20000), "--", *sub]
    assert Path(f"{record}.hosts").read_text() == "node-a slots=2\nnode-b slots=2\n"
    assert not any(p.name == "pwned" for p in tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()


@pytest.mark.parametrize("step_ends, requeued, code", [
    ("consumes the stop request", True, 0),   # checkpoint saved before the end: requeue to resume
    ("finishes first", False, 0),             # the work was done: nothing to resume
    ("fails", False, 3),                      # a failure is reported, not retried
])
def test_slurm_script_requeues_only_a_job_that_stopped_early(tmp_path, hostile, capsys, step_ends, requeued, code):
    recipe, out = hostile
    script, _ = render_dry_run(["--nodes", "1", "--gpus-per-node", "2", "--gpu-request", "cpus", "--", "distill",
                                "--config", str(recipe), f"output_dir={out}"], capsys)
    marks = tmp_path / "marks"
    marks.mkdir()
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "scontrol", f"""#!/bin/bash
case "$1" in show) echo node-a ;; requeue) echo "$2" > {marks}/requeued ;; esac
""")
    # the job step: waits for the STOP request, then ends the way this case says
    executable(bin_dir / "srun", f"""#!/bin/bash
touch {marks}/started
for _ in $(seq 1 600); do [ -e "$OUT/STOP" ] && break; sleep 0.1; done
case "$END" in consume) rm "$OUT/STOP"; exit 0 ;; finish) exit 0 ;; *) exit 3 ;; esac
""")
    (out / "slurm").mkdir(parents=True)
    end = {"consumes the stop request": "consume", "finishes first": "finish", "fails": "fail"}[step_ends]
    job_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-a",
               "SLURM_JOB_NUM_NODES": "1", "OUT": str(out), "END": end}
    batch = subprocess.Popen(["bash", "-c", script], env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / "started").exists():
            assert time.monotonic() < deadline and batch.poll() is None, "the job step never started"
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)  # what Slurm sends --signal-seconds before the time limit
        log, _ = batch.communicate(timeout=90)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == code, log
    assert "USR1: asking the training to save a checkpoint and stop" in log
    assert (marks / "requeued").exists() == requeued, log
    if requeued:
        assert (marks / "requeued").read_text().strip() == "77"
    assert not (out / "STOP").exists(), "a leftover STOP would stop the next run at once"


def test_slurm_script_without_gpus_asks_one_cpu_per_rank(hostile, capsys):
    recipe, _ = hostile
    script, _ = render_dry_run(["--nodes", "1", "--gpus-per-node", "2", "--gpu-request", "cpus", "--", "distill",
                                "--config", str(recipe)], capsys)
    assert "#SBATCH --cpus-per-task=2" in script and "--gpus-per-node" not in script.split("set -uo")[0]


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu\n#SBATCH --exclusive"], "--partition"),
    (["--account", "a b"], "--account"),
    (["--time", "soon"], "--time 'soon'"),
    (["--time", "4", "--signal-seconds", "300"], "not longer than --signal-seconds"),
    (["--job-name", "x;y"], "--job-name"),
    (["--nodes", "0"], "--nodes must be >= 1"),
])
def test_submit_bad_input_is_a_clear_error(hostile, args, message):
    recipe, _ = hostile
    base = {"--nodes": "1", "--gpus-per-node": "1", "--gpu-request": "gpus"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    assert message in user_error(["submit", "slurm", "--dry-run", *flat, "--", "distill", "--config", str(recipe)])


def test_submit_checks_its_arguments_before_asking_sinfo(hostile, tmp_path, monkeypatch, capsys):
    """A malformed partition is refused before it reaches any Slurm command."""
    recipe, _ = hostile
    bin_dir, asked = tmp_path / "bin", tmp_path / "sinfo_was_asked"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\ntouch {shlex.quote(str(asked))}\necho gpu:2\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    message = user_error(["submit", "slurm", "--dry-run", "--nodes", "1", "--gpus-per-node", "1", "--partition",
                          "gpu\n#SBATCH --exclusive", "--", "distill", "--config", str(recipe)])
    assert "--partition" in message and not asked.exists()
    user_error(["submit", "slurm", "--dry-run", "--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu",
                "--", "distill", "--config", str(tmp_path / "missing.yaml")])
    assert not asked.exists()  # nor is it asked for a job whose recipe is missing
    script, _ = render_dry_run(["--nodes", "1", "--gpus-per-node", "2", "--partition", "gpu", "--", "distill",
                                "--config", str(recipe)], capsys)
    assert asked.exists() and "#SBATCH --gpus-per-node=2" in script  # a valid job does ask, and gets GPUs


def test_submit_marks_the_new_output_dir_it_puts_the_job_logs_in(tmp_path, hostile, capsys, monkeypatch):
    """OUTPUT_DIR/slurm, made by submit, must not make the job refuse its own output_dir as a user's folder;
    a folder the user already filled is never adopted."""
    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.errors import UserError
    from ernie_tiny_ds.outputs import claim_output_dir, marker_kind, recipe_inputs

    recipe, out = hostile
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "sbatch", "#!/bin/sh\necho 4242\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    submit = ["submit", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--gpu-request", "cpus", "--", "distill",
              "--config", str(recipe), "--stage", "general"]
    assert "submitted batch job 4242" in in_process(submit, capsys)
    assert list((out / "slurm").glob("ernie-tiny-ds-distill-*.sbatch")) and marker_kind(out) == "output_dir"
    claim_output_dir(out, recipe_inputs(load_recipe(recipe)))  # what the job checks first: accepted

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert "submitted batch job 4242" in in_process([*submit, f"output_dir={mine}"], capsys)
    assert marker_kind(mine) is None
    with pytest.raises(UserError, match="is not empty and was not written by ernie-tiny-ds"):
        claim_output_dir(mine, {})


def test_submit_without_a_recipe_needs_a_log_dir():
    message = user_error(["submit", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--dry-run", "--", "export",
                          "--checkpoint", "c", "--output", "o"])
    assert "give --log-dir" in message


# --------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_launch_exits_with_the_jobs_code(tmp_path):
    proc = run_cli(["launch", "--num_gpus", "1", "--master_port", str(free_port()), "--", "distill", "--config",
                    str(tmp_path / "missing.yaml")], timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: recipe file not found: {tmp_path / 'missing.yaml'}" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_nodes_without_ssh_train_as_one_job(tmp_path, tokenizer_dir, vocab_size):
    """Two launchers (node 0 and node 1, one rank each) form one world of 2: same losses as one 2-rank node."""
    recipe = tiny_recipe(tmp_path / "nodes", tokenizer_dir, vocab_size)
    codes, text = two_node_launch(tmp_path, recipe)
    assert codes == [0, 0], "\n----\n".join(t[-4000:] for t in text)
    for node, log_text in enumerate(text):
        # the ranks of a node print its line; a world of 2 numbers them 0 and 1
        assert re.findall(r"\[rank (\d)\] pid \d+ General Distillation: ZeRO-\d", log_text) == [str(node)]
    assert "General Distillation done: 6 steps" in text[0]
    two_nodes = read_metrics(tmp_path / "nodes/out/general/metrics.jsonl")

    # the same recipe on one node with two ranks, through `launch` as well
    single = tiny_recipe(tmp_path / "single", tokenizer_dir, vocab_size)
    proc = run_cli(["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "distill", "--config",
                    str(single), "--stage", "general"], timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    one_node = read_metrics(tmp_path / "single/out/general/metrics.jsonl")
    assert [m["step"] for m in two_nodes] == list(range(1, 7))
    assert [m["loss"] for m in two_nodes] == pytest.approx([m["loss"] for m in one_node], rel=1e-6)
    assert (tmp_path / "nodes/out/general/student/model.safetensors").is_file()
