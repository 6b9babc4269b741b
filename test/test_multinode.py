"""Two torchrun "nodes" on 127.0.0.1: each launch runs from its own working folder with its own cache folder,
as two machines share nothing but the network, and they meet through a c10d rendezvous on gloo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tiny_training import REPO, STAGE1, STAGE2, script_env, write_config

from utils.checkpoint import load_checkpoint

TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(tmp_path: Path, script: str, *args: str) -> list[subprocess.CompletedProcess]:
    """Launch ``script ARGS`` on node 0 and node 1 (one process each) and wait for both."""
    endpoint = f"127.0.0.1:{free_port()}"
    launches = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir(exist_ok=True)
        env = script_env()
        env.pop("VQGAN_TOKEN_CACHE", None)
        env["XDG_CACHE_HOME"] = str(folder / "cache")  # each node's own cache, as on its own disk
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                   "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                   "--rdzv-id=multinode-test", "--max-restarts=0", str(REPO / script), *args]
        launches.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    results = []
    for launch in launches:
        try:
            out, err = launch.communicate(timeout=TIMEOUT_S)
        finally:
            launch.kill()
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return results


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_two_nodes_train_both_stages_resume_and_share_no_folder(tmp_path: Path) -> None:
    stage1_config = write_config(tmp_path, "vqgan", STAGE1)
    stage2_config = write_config(tmp_path, "prior", STAGE2)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"

    results = two_nodes(tmp_path, "train_vqgan.py", "--config", str(stage1_config), "--run-dir", "s1",
                        "train.max_steps=3")
    assert_ok(results)
    assert "weights identical on all 2 processes" in results[0].stdout
    assert load_checkpoint(node0 / "s1" / "checkpoints" / "last.pt")["step"] == 3
    assert not (node1 / "s1").exists()  # only global rank 0 writes

    # --resume on both nodes: node 1 has no copy of the run folder; rank 0 sends it the checkpoint
    results = two_nodes(tmp_path, "train_vqgan.py", "--config", str(stage1_config), "--run-dir", "s1", "--resume",
                        "train.max_steps=5")
    assert_ok(results)
    assert "resumed at   step 3" in results[0].stdout
    assert load_checkpoint(node0 / "s1" / "checkpoints" / "last.pt")["step"] == 5
    assert not (node1 / "s1").exists()

    # stage 2 needs the stage-1 checkpoint on every node: a node without it stops the job at once, by name
    results = two_nodes(tmp_path, "train_transformer.py", "--config", str(stage2_config), "--run-dir", "s2",
                        "--vqgan", "s1/checkpoints/last.pt", "train.max_steps=3")
    assert [result.returncode for result in results] != [0, 0]
    assert "checkpoint 's1/checkpoints/last.pt' does not exist" in results[1].stderr
    assert "rank 1 on host" in results[0].stderr and "does not exist" in results[0].stderr
    assert not (node0 / "s2" / "checkpoints").exists()

    (node1 / "s1" / "checkpoints").mkdir(parents=True)
    shutil.copy(node0 / "s1" / "checkpoints" / "last.pt", node1 / "s1" / "checkpoints" / "last.pt")
    results = two_nodes(tmp_path, "train_transformer.py", "--config", str(stage2_config), "--run-dir", "s2",
                        "--vqgan", "s1/checkpoints/last.pt", "train.max_steps=3")
    assert_ok(results)
    assert "weights identical on all 2 processes" in results[0].stdout
    assert load_checkpoint(node0 / "s2" / "checkpoints" / "last.pt")["step"] == 3
    for node in (node0, node1):  # each node tokenised into its own cache, away from its working folder
        assert len(list((node / "cache" / "vqgan" / "tokens").glob("builtin_train_*.pt"))) == 1
        assert not (node / ".cache").exists()
