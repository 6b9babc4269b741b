"""The README stays true: its config reference, test command, images, and every command it shows.

The commands are taken from the README's ``bash`` blocks and run in a quick form: training
commands on the quickstart configs get overrides for a tiny model and a few steps; training
commands for other datasets must at least parse their config and overrides; ``generate.py``
commands run with few samples, on the quick runs' checkpoints when theirs was not trained here;
``benchmarks.run`` has its flags parsed (``test_fast_paths`` runs the whole benchmark in its tiny form).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_training import REPO, STAGE1, STAGE2, script_env

import benchmarks.run as bench_run
import generate
from benchmarks.cli import benchmark_parser
from transformer.config import Stage2Config
from utils.config import describe, load_config
from vqgan.config import Stage1Config

README = (REPO / "README.md").read_text()
MAX_IMAGE_BYTES = 300 * 1024


def _overrides(config: dict) -> list[str]:
    return [f"{section}.{key}={value}".replace(" ", "") for section, values in config.items()
            for key, value in values.items()]


def readme_commands() -> list[list[str]]:
    """Every ``python ...`` / ``torchrun ...`` line of the README's bash blocks, as argument lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("python ", "torchrun ", "pytest ")):
                commands.append(shlex.split(line))
    return commands


def test_config_reference_matches_the_code():
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    reference = README.split(start, 1)[1].split(end, 1)[0]
    expected = ("### Stage 1 (`train_vqgan.py`)\n\n" + describe(Stage1Config)
                + "\n\n### Stage 2 (`train_transformer.py`)\n\n" + describe(Stage2Config) + "\n")
    assert reference == expected, ("README config reference is stale: paste `python train_vqgan.py --describe-config` "
                                   "and `python train_transformer.py --describe-config`")


def readme_block(heading: str) -> list[str]:
    """The lines of the first ``bash`` block under the README heading ``## heading``."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()


def test_ci_runs_the_readme_setup_and_test_commands():
    """.ci/run builds a new virtual environment and runs exactly the README's setup and test commands."""
    script = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_block("Setup") == ["pip install -r requirements.txt"]
    (test_command,) = readme_block("Tests")
    assert test_command == "pytest --cov-config=.coveragerc --cov=. test"
    assert readme_block("Setup")[0] in script and test_command in script
    assert script.index(readme_block("Setup")[0]) < script.index(test_command)
    assert any(line.startswith("python3 -m venv") for line in script)


def test_images_exist_and_are_small():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    for image in images:
        path = REPO / image
        assert path.is_file(), f"README shows {image}, which is not in the repository"
        assert path.stat().st_size < MAX_IMAGE_BYTES, f"{image} is over 300 KB"


def test_every_config_named_in_the_readme_loads():
    for name in set(re.findall(r"configs/[\w.]+\.yaml", README)):
        cls = Stage2Config if "transformer" in name else Stage1Config
        load_config(cls, REPO / name).validate()


def _quick_module(command: list[str], out: Path) -> list[str]:
    """The quick form of a ``python -m benchmarks...`` command: a tiny model, one variant, a few steps."""
    module = command[2]
    if module == "benchmarks.gpu_check":  # run with the GPUs hidden: the skip path
        return [sys.executable, "-m", module, "--out", str(out / "gpu.json")]
    if module == "benchmarks.window_sampling":  # against taming where installed, else it says so and stops
        return [sys.executable, "-m", module, "--tiny", "--threads", "1", "--out", str(out / "window.json")]
    if module in ("benchmarks.make_paired_fashion_mnist", "benchmarks.conditional_quality"):
        return [sys.executable, "-m", module, "--help"]  # they need Fashion-MNIST; their own tests run them
    assert module == "benchmarks.ablation", f"README runs an unknown module {module}"
    return [sys.executable, "-m", module, "--config", "configs/quickstart.yaml", "--only", "ours",
            "--eval-images", "8", "--out", str(out / "ablation"), *_overrides(STAGE1)]


QUICK_SAMPLES = 4


def _stand_in_run(checkpoint: str, workdir: Path) -> str:
    """A checkpoint of a run the quick commands did not train is replaced by the quickstart run of its stage."""
    if (workdir / checkpoint).exists() or not checkpoint.startswith("runs/"):
        return checkpoint
    run, rest = checkpoint.removeprefix("runs/").split("/", 1)
    conditional = any(kind in run for kind in ("segmentation", "depth", "superres"))  # the quick map-conditioned runs
    stand_in = "quickstart_segmentation" if conditional else "quickstart"
    stand_in += "_transformer" if run.endswith("_transformer") else "_vqgan" if conditional else ""
    return f"runs/{stand_in}/{rest}"


def _quick_generate(command: list[str], workdir: Path) -> list[str]:
    """``generate.py`` on the quick runs' checkpoints, with at most QUICK_SAMPLES samples."""
    quick = list(command)
    if quick[2] == "import-taming":  # a published taming checkpoint: the tiny one written by its own modules
        quick[quick.index("--checkpoint") + 1] = str(REPO / "test" / "fixtures" / "taming_tiny.ckpt")
        return quick
    if "--checkpoint" in quick:
        i = quick.index("--checkpoint") + 1
        quick[i] = _stand_in_run(quick[i], workdir)
    if "--num" in quick:
        i = quick.index("--num") + 1
        quick[i] = str(min(int(quick[i]), QUICK_SAMPLES))
    if "--size" in quick:  # beyond the training size: twice the quick runs' image size
        quick[quick.index("--size") + 1] = str(2 * STAGE1["data"]["image_size"])
    if "--condition" in quick and not (workdir / quick[quick.index("--condition") + 1]).exists():
        quick[quick.index("--condition") + 1] = "test"  # a user's folder of maps: the held-out maps instead
    return quick


# The quickstart configs run in their quick form; the segmentation ones keep their own loss and condition.
QUICK_STAGE1 = {"configs/quickstart.yaml": STAGE1,
                "configs/quickstart_segmentation_vqgan.yaml": {
                    k: STAGE1[k] for k in ("data", "model", "disc", "train")}}
QUICK_STAGE2 = {"configs/quickstart_transformer.yaml": {**STAGE2, "data": STAGE1["data"]},
                "configs/quickstart_segmentation_transformer.yaml": {
                    "data": STAGE1["data"], "train": STAGE2["train"],
                    "transformer": {k: v for k, v in STAGE2["transformer"].items() if k.startswith("n_")}}}


def _quick(command: list[str], workdir: Path) -> list[str] | None:
    """The quick form of a README command, or None when it only needs its config checked."""
    script = command[1] if command[0] == "python" else None
    config = command[command.index("--config") + 1] if "--config" in command else None
    if script == "train_vqgan.py":
        return command + _overrides(QUICK_STAGE1[config]) if config in QUICK_STAGE1 else None
    if script == "train_transformer.py":
        return command + _overrides(QUICK_STAGE2[config]) if config in QUICK_STAGE2 else None
    if script == "generate.py":
        return _quick_generate(command, workdir)
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "configs", folder / "configs")
    return folder


def test_readme_commands_run(workdir):
    ran = []
    for command in readme_commands():
        if command[0] == "pytest":
            continue
        if command[0] == "torchrun":
            script = command[command.index("--config") - 1]
            assert (REPO / script).is_file()
            config = command[command.index("--config") + 1]
            load_config(Stage2Config if script == "train_transformer.py" else Stage1Config, REPO / config)
            continue
        if command[1:3] == ["generate.py", "demo"]:  # a server: test_demo drives it in a browser; here its flags
            generate.build_parser().parse_args(command[2:])
            continue
        if command[:3] == ["python", "-m", "benchmarks.run"]:  # test_fast_paths runs it whole; here its flags
            benchmark_parser(bench_run.__doc__).parse_args(command[3:])
            continue
        if command[:2] == ["python", "-m"]:
            result = subprocess.run(_quick_module(command, workdir), cwd=workdir,
                                    env={**script_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stderr[-2000:]}"
            ran.append(command[1:3])
            continue
        quick = _quick(command, workdir)
        if quick is None:
            config = command[command.index("--config") + 1]
            args = command[command.index("--config") + 2:]
            cls = Stage2Config if command[1] == "train_transformer.py" else Stage1Config
            load_config(cls, REPO / config, [a for a in args if "=" in a and not a.startswith("-")]).validate()
            continue
        quick = [sys.executable, str(REPO / quick[1]), *quick[2:]]
        result = subprocess.run(quick, cwd=workdir, env=script_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stderr[-2000:]}"
        ran.append(command[1:3])
    assert ["train_vqgan.py", "--config"] in ran and ["generate.py", "sample"] in ran
