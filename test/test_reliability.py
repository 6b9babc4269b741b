"""Real training processes: killed at random moments, stopped by SIGTERM, failing cleanly, and run as
two gloo DDP processes under torchrun (including a rank that fails)."""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from tiny_training import REPO, STAGE1, STAGE2, read_rows, script_env, start, write_config

from utils.checkpoint import load_checkpoint

TIMEOUT_S = 120

LAUNCHER = """
import json, os, sys, time, traceback
import train_vqgan  # imported once; every training process is forked from here, ready to run

real_fsync = os.fsync

def slow_fsync(fd):  # a slow disk: every checkpoint write stays in flight for a while
    time.sleep(0.5)
    real_fsync(fd)

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if request["slow_disk"]:
            os.fsync = slow_fsync
        code = 0
        try:
            train_vqgan.main(request["args"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

DDP_RUNNER = """
import hashlib, json, os, sys
import torch
import torch.distributed as dist
import train_vqgan
import utils.logging

rank, out = int(os.environ["RANK"]), sys.argv.pop(1)
calls, modules = [], []

def recorded(name, real):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return wrapper

for name in ("save_checkpoint", "save_config", "save_reconstruction_grid", "plot_training_curves"):
    setattr(train_vqgan, name, recorded(name, getattr(train_vqgan, name)))
utils.logging.MetricsLogger = recorded("MetricsLogger", utils.logging.MetricsLogger)
real_wrap, real_train, real_lr = train_vqgan.wrap_ddp, train_vqgan.train, train_vqgan.lr_factor

def wrap_ddp(module, *args, **kwargs):
    modules.append(module)
    return real_wrap(module, *args, **kwargs)

def train(*args, **kwargs):
    real_train(*args, **kwargs)
    digest = hashlib.sha256()
    for module in modules:  # BatchNorm statistics are rank-local between forwards; the rest must agree
        for name, tensor in module.state_dict().items():
            if "running_" not in name:
                digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    if rank == 0:
        with open(os.path.join(out, "digests.json"), "w") as handle:
            json.dump(gathered, handle)

def lr_factor(step, *rest):
    if os.environ.get("FAIL_RANK") == str(rank) and step == 2:
        raise RuntimeError(f"injected failure on rank {rank}")
    return real_lr(step, *rest)

train_vqgan.wrap_ddp, train_vqgan.train, train_vqgan.lr_factor = wrap_ddp, train, lr_factor
try:
    train_vqgan.main(sys.argv[1:])
finally:
    with open(os.path.join(out, f"calls_rank{rank}.json"), "w") as handle:
        json.dump(calls, handle)
"""


class Launcher:
    """Forks training processes from one warm interpreter, so each kill-and-resume skips the start-up."""

    def __init__(self, folder: Path) -> None:
        (folder / "launcher.py").write_text(LAUNCHER)
        self.folder = folder
        self.process = start([str(folder / "launcher.py")], folder, stdin=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        self.count = 0

    def launch(self, args: list[str], slow_disk: bool = False) -> Child:
        self.count += 1
        log = self.folder / f"launch{self.count}.log"
        self.process.stdin.write(json.dumps({"args": args, "log": str(log), "slow_disk": slow_disk}) + "\n")
        self.process.stdin.flush()
        return Child(int(self.next_line()), log, self)

    def next_line(self) -> str:
        try:
            return self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.close()
            pytest.fail(f"the launcher did not answer within {TIMEOUT_S} s: {self.process.stderr.read()[-3000:]}")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class Child:
    """One forked training process: its pid, its output file, and its exit code once it ended."""

    def __init__(self, pid: int, log: Path, launcher: Launcher) -> None:
        self.pid, self.log, self.launcher = pid, log, launcher

    def output(self) -> str:
        return self.log.read_text()

    def running(self) -> bool:
        return self.launcher.lines.empty()

    def signal_and_wait(self, sig: int) -> int:
        os.kill(self.pid, sig)
        return self.wait()

    def wait(self) -> int:
        return int(self.launcher.next_line())

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition``; fail with the process output if the process ends or time runs out first."""
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if not self.running() or time.monotonic() > deadline:
                pytest.fail(f"never saw {what}; output:\n{self.output()[-3000:]}")
            time.sleep(0.005)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"process did not finish within {TIMEOUT_S} s:\n{out[-2000:]}\n{err[-3000:]}")
    return process.returncode, out, err


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def test_killed_runs_resume_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    max_steps = 40
    config = write_config(tmp_path, "tiny", {**STAGE1, "train": {**STAGE1["train"], "max_steps": max_steps,
                                                                   "ckpt_every": 1}})
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    last = checkpoints / "last.pt"
    args = ["--config", str(config), "--run-dir", str(run)]
    launcher = Launcher(tmp_path)
    rng = random.Random()
    expected_start = 0

    def launch(slow_disk: bool = False) -> Child:
        previous = inode(last)
        child = launcher.launch(args + (["--resume"] if expected_start else []), slow_disk)
        child.wait_for(lambda: inode(last) not in (None, previous), "a checkpoint written by this run")
        return child

    def check_resumed(child: Child) -> None:
        if expected_start:
            assert f"resumed at   step {expected_start}\n" in child.output()

    try:
        # SIGKILL at random moments of training, twice.
        for delay in (rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.5)):
            child = launch()
            time.sleep(delay)
            assert child.signal_and_wait(signal.SIGKILL) == -signal.SIGKILL
            check_resumed(child)
            expected_start = load_checkpoint(last, kind="vqgan")["step"]  # the last complete write, intact

        # SIGKILL while a checkpoint is being written (a slow disk keeps the write in flight).
        child = launch(slow_disk=True)
        child.wait_for(lambda: any(checkpoints.glob(".*.tmp*")), "a checkpoint write in progress")
        assert child.signal_and_wait(signal.SIGKILL) == -signal.SIGKILL
        check_resumed(child)
        assert any(checkpoints.glob(".*.tmp*"))  # the interrupted write never replaced a complete file
        expected_start = load_checkpoint(last, kind="vqgan")["step"]

        # SIGTERM saves last.pt and exits with a message and code 143.
        child = launch()
        time.sleep(rng.uniform(0.0, 0.3))
        assert child.signal_and_wait(signal.SIGTERM) == 143, child.output()[-3000:]
        check_resumed(child)
        expected_start = load_checkpoint(last)["step"]
        assert f"Received SIGTERM: saved {last} at step {expected_start}. Continue with --resume." in child.output()
        assert not any(checkpoints.glob(".*.tmp*"))  # resuming cleared the interrupted write's leftovers

        # The last resume reaches the end.
        child = launcher.launch(args + ["--resume"])
        assert child.wait() == 0, child.output()[-3000:]
        check_resumed(child)
    finally:
        launcher.close()
    assert expected_start < max_steps and load_checkpoint(last)["step"] == max_steps
    assert [int(row["step"]) for row in read_rows(run / "metrics.csv")] == list(range(1, max_steps + 1))


def test_user_errors_end_both_scripts_with_a_short_message(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a checkpoint")
    stage2_config = write_config(tmp_path, "prior", STAGE2)
    stage1 = start([str(REPO / "train_vqgan.py"), "--config", str(tmp_path / "missing.yaml")], tmp_path)
    stage2 = start([str(REPO / "train_transformer.py"), "--config", str(stage2_config), "--run-dir",
                    str(tmp_path / "run"), "--vqgan", str(bogus)], tmp_path)
    expected = {stage1: "missing.yaml' does not exist", stage2: "is not a file written by torch.save"}
    for process, message in expected.items():
        code, _, err = finish(process)
        assert code == 2 and "Traceback" not in err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def torchrun(tmp_path: Path, run: Path, *overrides: str, fail_rank: int | None = None) -> subprocess.CompletedProcess:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    runner = tmp_path / "ddp_runner.py"
    runner.write_text(DDP_RUNNER)
    config = write_config(tmp_path, "tiny", STAGE1)
    env = script_env()
    if fail_rank is not None:
        env["FAIL_RANK"] = str(fail_rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner),
               str(tmp_path), "--config", str(config), "--run-dir", str(run), *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_two_process_ddp_run_only_rank0_writes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = torchrun(tmp_path, run, "train.ckpt_every=3", "model.ema=true",
                      "model.dead_code_steps=2", "train.ema_decay=0.9")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("VQGAN stage 1") == 1 and "2 process(es)" in result.stdout

    assert json.loads((tmp_path / "calls_rank1.json").read_text()) == []
    rank0 = json.loads((tmp_path / "calls_rank0.json").read_text())
    assert {"save_checkpoint", "save_config", "save_reconstruction_grid", "MetricsLogger"} <= set(rank0)
    digests = json.loads((tmp_path / "digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]  # weights and codebook buffers agree across ranks

    assert [int(r["step"]) for r in read_rows(run / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert float(read_rows(run / "metrics.csv")[-1]["items_per_s"]) > 0
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "step_000003.pt", "step_000006.pt"}
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6


def test_a_failing_rank_ends_the_whole_ddp_job(tmp_path: Path) -> None:
    started = time.monotonic()
    result = torchrun(tmp_path, tmp_path / "run", "train.max_steps=200", fail_rank=1)
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in result.stdout + result.stderr
    assert time.monotonic() - started < TIMEOUT_S
