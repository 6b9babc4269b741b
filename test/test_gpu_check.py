"""The parts of ``python -m benchmarks.gpu_check`` that run without a GPU: arguments, the skip without CUDA, the
peak table and MFU arithmetic, the verdicts, the table and report, the time budget, and one part run in a
child process (a CPU rehearsal of the sampling measurement)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


def test_peak_bf16_table_by_device_name_and_override() -> None:
    names = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0,
             "NVIDIA L40S": 362.0, "NVIDIA GeForce RTX 4090": 165.0, "Tesla T4": None, "cpu": None}
    assert {name: gpu_check.peak_tflops(name) for name in names} == names
    assert gpu_check.peak_tflops("Tesla T4", override=65.0) == 65.0
    assert gpu_check.peak_tflops("NVIDIA H200", override=500.0) == 500.0


def test_mfu_arithmetic() -> None:
    # 12 TFLOP per step in 50 ms on a 989 TFLOP/s GPU: 240 TFLOP/s achieved, 24.3%.
    assert gpu_check.mfu(12e12, 0.05, 989.0) == pytest.approx(12e12 / 0.05 / 989e12)
    assert gpu_check.mfu(12e12, 0.05, 989.0) == pytest.approx(0.2427, abs=1e-4)
    assert gpu_check.mfu(989e12, 1.0, 989.0) == pytest.approx(1.0)
    assert gpu_check.mfu(12e12, 0.05, None) is None
    assert gpu_check.mfu(12e12, 0.0, 989.0) is None


def test_loss_must_fall_and_stay_finite() -> None:
    assert gpu_check.loss_fell([0.5, 0.4, 0.45, 0.3])
    assert not gpu_check.loss_fell([0.5, 0.6])
    assert not gpu_check.loss_fell([0.5, math.nan, 0.3])
    assert not gpu_check.loss_fell([0.5])


def test_junit_counts(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="6" failures="1" '
                      'errors="0" skipped="2"></testsuite></testsuites>')
    assert gpu_check.junit_counts(report) == {"tests": 6, "failures": 1, "errors": 0, "skipped": 2}


@pytest.mark.parametrize("argv", [["--peak-tflops", "0"], ["--budget", "-5"], ["--part", "sampling"],
                                  ["--part", "nonsense", "--work-dir", "w", "--out", "o"]])
def test_bad_arguments_are_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_without_cuda_it_says_so_writes_a_skipped_report_and_exits_0(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "nested" / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("skipped: CUDA is not available") and "Nothing was measured" in printed
    report = json.loads(out.read_text())
    assert report["skipped"] is True and report["passed"] is None and "CUDA is not available" in report["reason"]


def test_failed_parts_table_and_report(tmp_path: Path) -> None:
    results = {
        "tests": {**gpu_check.result("pass", "7 tests, 0 failed", tests=7), "required": True, "seconds": 61.2},
        "stage1": {**gpu_check.result("fail", "eager: rec_loss 0.5 -> 0.6"), "required": True, "seconds": 80.0},
        "sampling_compiled": {**gpu_check.result("not available", "timed out"), "required": False, "seconds": 9.0},
    }
    assert gpu_check.failed(results) == ["stage1"]
    table = gpu_check.format_table(results).splitlines()
    assert table[0].split() == ["part", "status", "s", "result"] and set(table[1]) == {"-"}
    assert table[2].split()[:3] == ["tests", "pass", "61"] and table[2].endswith("7 tests, 0 failed")
    assert "not available" in table[4] and len(table) == 5
    gpu_check.write_report({"parts": results}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["parts"]["tests"]["figures"] == {"tests": 7}


def test_parts_that_do_not_fit_the_budget_are_not_run(tmp_path: Path, capsys) -> None:
    def never(*args):
        raise AssertionError("a part ran")

    parts = {"needed": (never, 60.0, True), "optional": (never, 60.0, False)}
    results = gpu_check.run_check(tmp_path, "cpu", None, budget_s=gpu_check.MIN_PART_S / 2, parts=parts)
    assert results["needed"]["status"] == "fail" and results["needed"]["detail"].startswith("not run")
    assert results["optional"]["status"] == "not available" and not results["optional"]["required"]
    assert gpu_check.failed(results) == ["needed"]
    assert "needed: fail" in capsys.readouterr().out


def test_a_part_runs_in_its_own_process_and_is_stopped_at_its_time_limit(tmp_path: Path) -> None:
    outcome = gpu_check.run_part_process("sampling", tmp_path, "cpu", None, timeout=240)
    assert outcome["status"] == "pass", outcome["detail"]
    assert outcome["figures"]["tok_per_s"] > 0 and outcome["figures"]["gpt"] == "8L-512w"
    stopped = gpu_check.run_part_process("sampling", tmp_path / "again", "cpu", None, timeout=0.2)
    assert stopped["status"] == "fail" and stopped["detail"].startswith("timed out after 0 s")


def test_a_check_without_time_for_its_parts_fails_with_a_table_and_a_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--budget", "1", "--out", str(out), "--work-dir",
                           str(tmp_path / "work")]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: tests, stage1, stage2, stage1_speed, sampling" in printed
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["meta"]["peak_source"].startswith("unknown GPU")
    assert list(report["parts"]) == list(gpu_check.PARTS)


def test_the_window_sampling_part_rehearses_on_the_cpu(tmp_path: Path) -> None:
    outcome = gpu_check.part_window_sampling(tmp_path, "cpu", None)
    figures = outcome["figures"]
    assert outcome["status"] == "pass" and figures["grid"] == 4 * figures["window"]
    assert figures["codes_per_s"] > 0 and figures["plain_codes_per_s"] > 0
