"""One prepared check of the CUDA path on one GPU: tests, short training runs, speed. Prints a table, writes JSON.

    python -m benchmarks.gpu_check --out gpu.json [--peak-tflops TFLOPS] [--budget SECONDS] [--work-dir DIR]

It needs no downloads and stays within ``--budget`` seconds (default 480, 8 minutes). Each part runs in its
own process with a time limit, in this order:

  tests                test/test_cuda.py under pytest (bf16 quantizer, compiled and fused steps, NCCL DDP,
                       no host sync between log steps)
  stage1               quickstart.yaml, 120 steps in bf16 with channels_last, eager and then with
                       train.compile=true: the reconstruction loss must fall and no step may be skipped
  stage2               quickstart_transformer.yaml on the eager stage-1 checkpoint, 100 steps (the loss must
                       fall), then generate.py sample
  stage1_speed         the f16 model of imagenet_f16.yaml at 256x256, its batch of 12, bf16, LPIPS (random
                       weights of the right shapes) + GAN: img/s, peak memory, model FLOP utilisation (MFU)
  sampling             the 8 x 512 GPT, 256 tokens, batch 16, KV cache: tokens/s
  window_sampling      the same GPT (a 16x16 window) sliding over a 64x64 grid: codes/s, beside plain sampling
  sampling_compiled    the same with sample.compile (the one-token decode step under torch.compile with
                       CUDA graphs) timed against eager sampling: tokens/s compiled vs eager
  stage1_speed_compiled  stage1_speed with the models under torch.compile, as imagenet_f16.yaml trains

The last two are measurements of optional paths: when they fail or run out of time they are reported as
not available.

MFU = model FLOPs per step (``torch.utils.flop_counter``) / time per step / the GPU's dense bf16 peak, taken
from a small table of data-sheet figures by device name (``--peak-tflops`` overrides it; an unknown GPU
gets no MFU).

Exit status: 0 when every part passed, 1 when a part failed or did not run; without CUDA it prints why it
skipped, writes ``{"skipped": true, ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_BUDGET_S = 480.0
MIN_PART_S = 20.0
F16_BATCH = 12
F16_RESOLUTION = 256
GIB = 2**30
SMALL_GPU_GIB = 24.0
CUDA_CONTEXT_GIB = 1.0

# Dense bf16 tensor-core peaks (fp32 accumulation, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name in order. SXM figures for H100/H200; PCIe/NVL boards are slower.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.0),
)

STAGE1_STEPS, STAGE2_STEPS, LOG_EVERY = 120, 100, 20
STAGE1_OVERRIDES = (f"train.max_steps={STAGE1_STEPS}", f"train.log_every={LOG_EVERY}", "train.warmup_steps=20",
                    "train.sample_every=0", "train.ckpt_every=0", "loss.disc_start=60", "loss.disc_warmup_steps=20",
                    "data.num_samples=4096", "data.num_workers=4")
STAGE2_OVERRIDES = (f"train.max_steps={STAGE2_STEPS}", f"train.log_every={LOG_EVERY}", "train.warmup_steps=20",
                    "train.sample_every=0", "train.ckpt_every=0", "data.num_samples=4096", "data.num_workers=4")



def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of the GPU called ``device_name`` in TFLOP/s: ``override``, else the table's, else None."""
    if override is not None:
        return override
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (TFLOP/s); None when the peak is unknown."""
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12)


def loss_fell(values: list[float]) -> bool:
    """Whether a logged loss is finite throughout and its last value is below its first."""
    return len(values) >= 2 and all(math.isfinite(v) for v in values) and values[-1] < values[0]


def junit_counts(path: Path) -> dict[str, int]:
    """Test, failure, error and skip counts of a pytest ``--junitxml`` report (all suites summed)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}


def result(status: str, detail: str = "", **figures: Any) -> dict[str, Any]:
    """A part's outcome: ``pass``, ``fail`` or ``not available``, a line of detail, and its figures."""
    return {"status": status, "detail": detail, "figures": figures}


def command_line(args: list[Any]) -> list[str]:
    return [str(arg) for arg in args]


def run_logged(args: list[Any], log: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with the repository importable, its output appended to ``log``; the completed process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command_line(args))}\n")
        handle.flush()
        return subprocess.run(command_line(args), cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              text=True)


def log_tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- parts (each runs in its own process)


def part_tests(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    junit, log = work / "tests.xml", work / "tests.log"
    done = run_logged([PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}",
                       REPO / "test" / "test_cuda.py"], log, cwd=REPO)
    if not junit.is_file():
        return result("fail", f"pytest wrote no report (exit {done.returncode}): {log_tail(log, 5)}")
    counts = junit_counts(junit)
    ok = done.returncode == 0 and counts["tests"] > 0 and not (counts["failures"] or counts["errors"]
                                                                or counts["skipped"])
    detail = (f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped")
    return result("pass" if ok else "fail", detail if ok else f"{detail}; see {log}", **counts)


def _device_overrides(device: str) -> list[str]:
    precision = "bf16" if device == "cuda" else "fp32"  # CPU: a rehearsal of the commands only
    return [f"train.device={device}", f"train.precision={precision}"]


def _training_run(script: str, config: str, run_dir: Path, overrides: list[str], log: Path,
                  loss_column: str, extra: tuple[str, ...] = ()) -> tuple[bool, str, dict[str, Any]]:
    """Run a training script; (loss fell and nothing was skipped, detail, figures)."""
    from utils.logging import read_metrics

    done = run_logged([PYTHON, REPO / script, "--config", REPO / "configs" / config, *extra, "--run-dir", run_dir,
                       "--force", *overrides], log, cwd=log.parent)
    metrics_csv = run_dir / "metrics.csv"
    if done.returncode != 0 or not metrics_csv.is_file():
        return False, f"{script} exited with {done.returncode}: {log_tail(log, 5)}", {}
    metrics = read_metrics(metrics_csv)
    losses = metrics[loss_column]
    figures = {f"first_{loss_column}": losses[0], f"last_{loss_column}": losses[-1],
               "items_per_s": metrics["items_per_s"][-1], "bad_steps": metrics["bad_steps"][-1]}
    per_step = re.findall(r"\(([\d.]+) s/step\)", log.read_text(errors="replace"))
    if per_step:
        figures["s_per_step"] = float(per_step[-1])
    ok = loss_fell(losses) and figures["bad_steps"] == 0
    detail = f"{loss_column} {losses[0]:.4f} -> {losses[-1]:.4f}, {figures['bad_steps']:.0f} skipped steps"
    return ok, detail, figures


def part_stage1(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    figures, details, ok = {}, [], True
    for variant in ("eager", "compiled"):
        overrides = [*STAGE1_OVERRIDES, *_device_overrides(device), "train.channels_last=true",
                     f"train.compile={str(variant == 'compiled').lower()}"]
        fell, detail, figures[variant] = _training_run("train_vqgan.py", "quickstart.yaml", work / f"stage1_{variant}",
                                                       overrides, work / f"stage1_{variant}.log", "rec_loss")
        details.append(f"{variant}: {detail}")
        ok = ok and fell
    return result("pass" if ok else "fail", "; ".join(details), **figures)


def part_stage2(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    stage1 = work / "stage1_eager" / "checkpoints" / "last.pt"
    if not stage1.is_file():
        return result("fail", f"needs the stage-1 checkpoint {stage1}, which the stage1 part did not write")
    log = work / "stage2.log"
    fell, detail, figures = _training_run("train_transformer.py", "quickstart_transformer.yaml", work / "stage2",
                                          [*STAGE2_OVERRIDES, *_device_overrides(device)], log, "loss",
                                          extra=("--vqgan", stage1))
    samples = work / "samples"
    done = run_logged([PYTHON, REPO / "generate.py", "sample", "--checkpoint", work / "stage2" / "checkpoints" /
                       "last.pt", "--num", 16, "--out", samples, "--device", device], log, cwd=work)
    sampled = done.returncode == 0 and (samples / "grid.png").is_file()
    detail += "; generate.py sample wrote 16 images" if sampled else f"; generate.py sample failed: {log_tail(log, 5)}"
    return result("pass" if fell and sampled else "fail", detail, **figures)


def _f16_speed(work: Path, device: str, peak: float | None, compiled: bool) -> dict[str, Any]:
    from benchmarks.lpips_weights import write_random_lpips_weights
    from benchmarks.memory import release_freed_memory
    from benchmarks.runtime import optimized
    from benchmarks.stage1 import Stage1Case, build_setup
    from benchmarks.timing import count_flops, time_alternating
    from utils.training import compile_module, count_parameters
    from vqgan.training import stage1_step

    torch_device = torch.device(device)
    resolution = F16_RESOLUTION if device == "cuda" else 32  # CPU: a rehearsal on a small image
    case = Stage1Case("f16", str(REPO / "configs" / "imagenet_f16.yaml"), (f"data.image_size={resolution}",),
                      F16_BATCH if device == "cuda" else 1)
    cfg = case.load(True, write_random_lpips_weights(work))
    setup = build_setup(cfg, case.batch, optimized(torch_device))
    train_model = compile_module(setup.model) if compiled else setup.model
    train_disc = compile_module(setup.disc) if compiled else setup.disc

    def step() -> None:
        with setup.runtime.backends():
            stage1_step(setup.model, setup.disc, setup.loss, setup.opt_ae, setup.opt_d, [setup.images], 0,
                        grad_clip=setup.grad_clip, amp_dtype=setup.runtime.amp_dtype, train_model=train_model,
                        train_disc=train_disc)

    release_freed_memory(torch_device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    timing = time_alternating({"step": step}, torch_device, reps=5, warmup=3)["step"]
    reserved = torch.cuda.max_memory_reserved(torch_device) if device == "cuda" else timing.peak_bytes
    if compiled:  # the same model FLOPs as the eager part counted, when it ran
        eager = work / "part_stage1_speed.json"
        flops = json.loads(eager.read_text())["figures"].get("tflop_per_step", 0) * 1e12 if eager.is_file() else None
    else:
        flops = count_flops(step)
    ema_bytes = 4 * count_parameters(setup.model)  # train_vqgan.py keeps an fp32 EMA copy (ema_decay 0.999)
    estimate_gib = (reserved + ema_bytes) / GIB + CUDA_CONTEXT_GIB
    figures = {"resolution": resolution, "batch": case.batch, "precision": setup.runtime.describe(),
               "compiled": compiled, "s_per_step": timing.median, "img_per_s": case.batch / timing.median,
               "peak_allocated_gib": timing.peak_bytes / GIB, "peak_reserved_gib": reserved / GIB,
               "training_script_estimate_gib": estimate_gib, "fits_24gb": estimate_gib <= SMALL_GPU_GIB}
    detail = (f"{figures['img_per_s']:.1f} img/s, peak {figures['peak_allocated_gib']:.1f} GiB allocated / "
              f"{figures['peak_reserved_gib']:.1f} GiB reserved; with the EMA copy and the CUDA context about "
              f"{estimate_gib:.1f} GiB ({'fits' if figures['fits_24gb'] else 'does not fit'} a 24 GB GPU)")
    if flops:
        figures["tflop_per_step"] = flops / 1e12
        figures["mfu"] = mfu(flops, timing.median, peak)
        detail += f", {flops / 1e12:.3g} TFLOP/step, " + (f"MFU {figures['mfu']:.1%}" if peak else "MFU unknown")
    return result("pass", detail, **figures)


def part_stage1_speed(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    return _f16_speed(work, device, peak, compiled=False)


def part_stage1_speed_compiled(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    return _f16_speed(work, device, peak, compiled=True)


def _sampling(device: str, compiled: bool) -> dict[str, Any]:
    from benchmarks.run import FULL_GPT
    from benchmarks.runtime import optimized
    from benchmarks.timing import paired_speedup, time_alternating
    from transformer import sample_tokens

    torch_device = torch.device(device)
    case = FULL_GPT
    tokens = case.sample_tokens if device == "cuda" else 8  # CPU: a rehearsal
    gpt = case.build(torch_device).eval()
    prefix = torch.full((case.sample_batch, 1), case.codebook_size, dtype=torch.long, device=torch_device)
    drawn: dict[str, torch.Tensor] = {}

    def sample(name: str) -> None:
        with optimized(torch_device).backends():
            drawn[name] = sample_tokens(gpt, prefix, tokens, compile=name == "compiled",
                                        generator=torch.Generator(torch_device).manual_seed(0))

    names = ("compiled", "eager") if compiled else ("eager",)
    timings = time_alternating({name: lambda name=name: sample(name) for name in names}, torch_device,
                               reps=3, warmup=2)
    per_s = {name: case.sample_batch * tokens / timing.median for name, timing in timings.items()}
    name = names[0]
    figures = {"gpt": case.name, "batch": case.sample_batch, "tokens": tokens, "tok_per_s": per_s[name],
               "s_per_sample_call": timings[name].median, "precision": optimized(torch_device).describe()}
    detail = f"{per_s[name]:.0f} tok/s ({case.sample_batch} x {tokens} tokens in {timings[name].median:.2f} s)"
    if compiled:
        speedup = paired_speedup(timings["compiled"], timings["eager"])
        same = bool(torch.equal(drawn["compiled"], drawn["eager"]))
        figures.update(eager_tok_per_s=per_s["eager"], speedup=speedup, same_tokens=same)
        detail += f"; eager {per_s['eager']:.0f} tok/s, {speedup:.2f}x; same tokens: {same}"
    return result("pass", detail, **figures)


def part_sampling(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    return _sampling(device, compiled=False)


def part_sampling_compiled(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    return _sampling(device, compiled=True)


def part_window_sampling(work: Path, device: str, peak: float | None) -> dict[str, Any]:
    """Sliding-window sampling of a grid 4x the training grid per side: codes/s, against plain sampling's."""
    import math

    from benchmarks.run import FULL_GPT, SCALES
    from benchmarks.runtime import optimized
    from benchmarks.timing import time_alternating
    from transformer import sample_tokens
    from transformer.window import sample_windowed

    torch_device = torch.device(device)
    case = FULL_GPT if device == "cuda" else SCALES["tiny"].gpt  # CPU: a rehearsal
    window = math.isqrt(case.seq_len)
    grid = 4 * window
    gpt = case.build(torch_device).eval()
    prefix = torch.full((case.sample_batch, 1), case.codebook_size, dtype=torch.long, device=torch_device)

    def windowed(size: int) -> None:
        with optimized(torch_device).backends():
            sample_windowed(gpt, prefix, (size, size), (window, window), top_k=100,
                            generator=torch.Generator(torch_device).manual_seed(0))

    def plain() -> None:
        with optimized(torch_device).backends():
            sample_tokens(gpt, prefix, window * window, top_k=100,
                          generator=torch.Generator(torch_device).manual_seed(0))

    timings = time_alternating({"windowed": lambda: windowed(grid), "plain": plain}, torch_device, reps=1, warmup=1,
                               warmups={"windowed": lambda: windowed(window + 1), "plain": plain})
    per_s = case.sample_batch * grid * grid / timings["windowed"].median
    plain_per_s = case.sample_batch * window * window / timings["plain"].median
    return result("pass", f"{per_s:.0f} codes/s on a {grid}x{grid} grid with a {window}x{window} window "
                          f"({timings['windowed'].median:.1f} s for {case.sample_batch}); plain sampling of the "
                          f"training grid {plain_per_s:.0f} codes/s",
                  gpt=case.name, batch=case.sample_batch, grid=grid, window=window, codes_per_s=per_s,
                  plain_codes_per_s=plain_per_s, precision=optimized(torch_device).describe())


Part = Callable[..., dict[str, Any]]  # (work folder, device, bf16 peak TFLOP/s or None) -> result
# name -> (function, most seconds it may take, required: its failure fails the check)
PARTS: dict[str, tuple[Part, float, bool]] = {
    "tests": (part_tests, 240.0, True),
    "stage1": (part_stage1, 200.0, True),
    "stage2": (part_stage2, 120.0, True),
    "stage1_speed": (part_stage1_speed, 150.0, True),
    "sampling": (part_sampling, 90.0, True),
    "window_sampling": (part_window_sampling, 90.0, False),
    "sampling_compiled": (part_sampling_compiled, 120.0, False),
    "stage1_speed_compiled": (part_stage1_speed_compiled, 240.0, False),
}


# ---------------------------------------------------------------- the check


def run_part_process(name: str, work: Path, device: str, peak_override: float | None,
                     timeout: float) -> dict[str, Any]:
    """Run one part in a child process (its own process group, killed whole at ``timeout``); its result."""
    work.mkdir(parents=True, exist_ok=True)
    out, log = work / f"part_{name}.json", work / f"part_{name}.log"
    args = [PYTHON, "-m", "benchmarks.gpu_check", "--part", name, "--work-dir", work, "--device", device,
            "--out", out]
    if peak_override is not None:
        args += ["--peak-tflops", peak_override]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        child = subprocess.Popen(command_line(args), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return result("fail", f"timed out after {timeout:.0f} s; log {log}")
    if out.is_file():
        return json.loads(out.read_text())
    return result("fail", f"exited with {code} without a result: {log_tail(log, 8)}")


def run_check(work: Path, device: str, peak_override: float | None, budget_s: float,
              parts: dict[str, tuple[Part, float, bool]] = PARTS) -> dict[str, dict[str, Any]]:
    """Every part in order, each limited to its own time and what is left of ``budget_s``."""
    deadline = time.monotonic() + budget_s
    results: dict[str, dict[str, Any]] = {}
    for name, (_, most_s, required) in parts.items():
        left = deadline - time.monotonic()
        started = time.monotonic()
        if left < MIN_PART_S:
            outcome = result("fail", f"not run: {left:.0f} s of the {budget_s:.0f} s budget left")
        else:
            outcome = run_part_process(name, work, device, peak_override, min(most_s, left))
        if not required and outcome["status"] == "fail":
            outcome = result("not available", outcome["detail"], **outcome["figures"])
        outcome["required"] = required
        outcome["seconds"] = time.monotonic() - started
        results[name] = outcome
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {outcome['status']} ({outcome['seconds']:.0f} s) "
              f"{outcome['detail']}", flush=True)
    return results


def failed(results: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the required parts that did not pass."""
    return [name for name, outcome in results.items() if outcome.get("required", True) and outcome["status"] != "pass"]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per part: name, status, seconds and its detail line."""
    rows = [("part", "status", "s", "result")]
    rows += [(name, r["status"], f"{r.get('seconds', 0.0):.0f}", r["detail"]) for name, r in results.items()]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]])
             for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines[:1]))
    return "\n".join(lines)


def environment(device: str, peak: float | None, peak_override: float | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
        meta["gpu_count"] = torch.cuda.device_count()
    meta["peak_bf16_tflops"] = peak
    meta["peak_source"] = ("--peak-tflops" if peak_override is not None else "table" if peak is not None
                           else "unknown GPU: pass --peak-tflops for MFU")
    return meta


def write_report(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def skip_report(reason: str) -> dict[str, Any]:
    return {"skipped": True, "reason": reason, "torch": torch.__version__, "cuda": torch.version.cuda,
            "passed": None, "parts": {}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the report to this JSON file")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s for MFU (default: from a table by device name)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep runs, logs and samples here (default: a temporary folder, removed at the end)")
    parser.add_argument("--part", choices=list(PARTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.part is not None and (args.work_dir is None or args.out is None):
        parser.error("--part needs --work-dir and --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part is not None:  # one part, in the child process run_part_process started
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        outcome = PARTS[args.part][0](args.work_dir, args.device, peak_tflops(name, args.peak_tflops))
        write_report(outcome, args.out)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = (f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                  f"the GPU check needs one CUDA GPU")
        print(f"skipped: {reason}. Nothing was measured.")
        write_report(skip_report(reason), args.out)
        if args.out is not None:
            print(f"wrote {args.out}")
        return 0
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    meta = environment(args.device, peak, args.peak_tflops)
    print(f"GPU check on {meta.get('gpu', 'cpu (rehearsal)')}, torch {torch.__version__}, "
          f"bf16 peak {peak or 'unknown'} TFLOP/s, budget {args.budget:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        results = run_check(work.resolve(), args.device, args.peak_tflops, args.budget)
    bad = failed(results)
    report = {"skipped": False, "passed": not bad, "failed": bad, "meta": meta, "parts": results}
    print(format_table(results))
    print("passed" if not bad else f"FAILED: {', '.join(bad)}")
    write_report(report, args.out)
    if args.out is not None:
        print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
