"""generate.py demo: the commands the page builds, the runs behind them (previews every N tokens, refusals as
messages) and, where Gradio, selenium and Chromium are installed, the page in a real headless browser."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_conditional_scripts import (
    Checkpoints,
    ckpts,  # noqa: F401  (the tiny priors of every condition kind)
)
from tiny_training import REPO, script_env, script_fails

import generate
from utils import demo

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 120


def model_of(path: Path, out: Path) -> demo.DemoModel:
    loaded = generate.LoadedPrior(*generate.load_prior(str(path), torch.device("cpu")), torch.device("cpu"))
    return generate.demo_model(generate.build_parser().parse_args(["demo", "--checkpoint", str(path)]), loaded,
                               out / "examples")


def request(**given: object) -> demo.Request:
    values = dict(mode="sample", class_name=demo.EVERY_CLASS, num=3, seed=1, decoding="sample", temperature=1.0,
                  top_k=8, top_p=1.0, cfg_scale=1.5, every=4, size=16, condition_upload=None,
                  condition_example=demo.NO_EXAMPLE, image_upload=None, image_example=demo.NO_EXAMPLE, keep=0.5)
    return demo.Request(**{**values, **given})


def run_page(model: demo.DemoModel, out: Path, mode: str, **given: object) -> list[tuple]:
    """Every update the page's handler streams for one click."""
    loaded = generate.LoadedPrior(*generate.load_prior(model.checkpoint, torch.device("cpu")), torch.device("cpu"))
    values = list(vars(request(mode=mode, **given)).values())[1:]
    runner = lambda argv, every, preview: generate.run_demo_command(loaded, argv, every, preview)  # noqa: E731
    return list(demo.generate(model, runner, out, mode, *values))


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_page_offers_what_the_prior_takes(ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    classes = model_of(ckpts.classes, tmp_path)
    assert classes.classes == ["circle", "square", "triangle", "ring", "cross", "stripes", "checker", "diamond",
                               "star", "crescent"]
    assert classes.guided and classes.sizes == [16, 24, 32, 40, 48, 56, 64] and classes.defaults["top_k"] == 8
    assert classes.example_names == [f"{i:06d}" for i in range(8)]
    assert sorted(p.name for p in (tmp_path / "examples" / "images").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    unconditional = model_of(ckpts.unconditional, tmp_path / "u")
    assert unconditional.classes == [] and not unconditional.guided
    segmentation = model_of(ckpts.segmentation, tmp_path / "s")
    maps = tmp_path / "s" / "examples" / "conditions"
    labels = np.asarray(Image.open(maps / "000000.png"))
    assert labels.dtype == np.uint8 and labels.shape == (16, 16) and 0 < labels.max() < 11
    assert segmentation.condition == "segmentation" and segmentation.maps and not classes.maps


def test_each_click_runs_the_command_it_shows(ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    model = model_of(ckpts.classes, tmp_path)
    updates = run_page(model, tmp_path / "runs", "sample", class_name="ring", every=16)
    previews, (grid, status, shown, download) = updates[:-1], updates[-1]
    assert status.startswith("done") and grid == download == str(tmp_path / "runs" / "0001" / "out" / "grid.png")
    assert [text for _, text, _, _ in previews] == [f"sampling: {n} / 64 tokens" for n in (16, 32, 48, 64)]
    assert "--class 3" in shown and "--num 3" in shown and "--seed 1" in shown
    argv = shlex.split(shown)[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    generate.main(argv)
    assert np.array_equal(pixels(grid), pixels(tmp_path / "again" / "grid.png"))


def test_previews_show_the_codes_drawn_so_far_and_grey_for_the_rest(ckpts: Checkpoints) -> None:  # noqa: F811
    prior, _ = generate.load_prior(str(ckpts.classes), torch.device("cpu"))
    shown: list[tuple[np.ndarray, int, int]] = []
    progress = generate.partial_grids(prior, 24, lambda image, done, total: shown.append((image, done, total)))
    codes = torch.randint(prior.vqgan.codebook_size, (1, 8, 8))
    for filled in range(1, 65):
        progress(codes, filled)
    assert [(done, total) for _, done, total in shown] == [(24, 64), (48, 64), (64, 64)]
    first, _, _ = shown[0]
    scale = first.shape[0] // 20  # one 16x16 image with 2 pixels of padding on each side, scaled up
    below = first[(2 + 8) * scale:(2 + 16) * scale, 2 * scale:(2 + 16) * scale]
    assert (below == 128).all()  # rows 3.. of the codes (pixels 6..) are not drawn yet at 24 of 64
    whole = shown[-1][0]
    assert not (whole[(2 + 8) * scale:(2 + 16) * scale, 2 * scale:(2 + 16) * scale] == 128).all()


def test_completion_and_conditions_go_through_their_commands(ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    classes = model_of(ckpts.classes, tmp_path)
    *_, (grid, status, shown, _) = run_page(classes, tmp_path / "runs", "complete", class_name="star",
                                            image_example="000002", num=2)
    assert status.startswith("done") and "complete" in shown and "--samples-per-input 2" in shown
    assert (tmp_path / "runs" / "0001" / "inputs" / "000002.png").is_file()
    segmentation = model_of(ckpts.segmentation, tmp_path / "s")
    *_, (grid, status, shown, _) = run_page(segmentation, tmp_path / "s" / "runs", "sample",
                                            condition_example="000001", size=32, num=2)
    assert status.startswith("done") and "--condition" in shown and "--size 32" in shown
    inputs = tmp_path / "s" / "runs" / "0001" / "inputs"
    assert (inputs / "conditions" / "000001.png").is_file() and (inputs / "images" / "000001.png").is_file()
    assert pixels(grid).shape[0] > 0


@pytest.mark.parametrize("case", ["not an image", "wrong labels", "no map", "no class", "too many"])
def test_bad_requests_end_in_a_message_on_the_page(case: str, ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    labels = tmp_path / "labels.png"
    Image.fromarray(np.full((16, 16), 40, np.uint8), mode="L").save(labels)
    checkpoint, mode, given, expected = {
        "not an image": (ckpts.classes, "complete", {"image_upload": str(text), "class_name": "ring"}, "notes"),
        "wrong labels": (ckpts.segmentation, "sample", {"condition_upload": str(labels)}, "holds label 40"),
        "no map": (ckpts.segmentation, "sample", {}, "upload one, or choose an example"),
        "no class": (ckpts.classes, "complete", {"image_example": "000001"}, "needs one class"),
        "too many": (ckpts.classes, "sample", {"num": 17}, "between 1 and 16"),
    }[case]
    model = model_of(checkpoint, tmp_path)
    if case == "no map":
        model.example_names = []
    *_, (grid, status, _, download) = run_page(model, tmp_path / "runs", mode, **given)
    assert grid is None and download is None and status.startswith("**error:**") and expected in status


def test_refusals_of_the_command_line_come_back_as_messages(ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    loaded = generate.LoadedPrior(*generate.load_prior(str(ckpts.classes), torch.device("cpu")), torch.device("cpu"))
    with pytest.raises(demo.RequestError, match="--temperature"):
        generate.run_demo_command(loaded, ["sample", "--checkpoint", str(ckpts.classes), "--out", str(tmp_path),
                                           "--temperature", "0"], 1, lambda *_: None)
    with pytest.raises(demo.RequestError, match="--class"):
        generate.run_demo_command(loaded, ["sample", "--checkpoint", str(ckpts.classes), "--out", str(tmp_path),
                                           "--class", "12"], 1, lambda *_: None)


def test_without_gradio_the_command_says_how_to_install_it(ckpts: Checkpoints, tmp_path: Path,  # noqa: F811
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    message = script_fails(capsys, generate.main, "demo", "--checkpoint", ckpts.classes, "--out", tmp_path)
    assert "pip install -r requirements-demo.txt" in message


def browser_missing() -> str | None:
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-demo.txt)"
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.is_file():
            return f"{program} is missing (Debian: apt-get install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_page(checkpoint: Path, out: Path, port: int) -> subprocess.Popen:
    """``generate.py demo`` in a subprocess, once its page answers."""
    env = {**script_env(), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, str(REPO / "generate.py"), "demo", "--checkpoint", str(checkpoint),
                               "--out", str(out), "--port", str(port), "--device", "cpu"], cwd=out.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo stopped: {server.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail("the demo page did not answer in time")


def headless_chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_the_page_in_a_real_browser(ckpts: Checkpoints, tmp_path: Path) -> None:  # noqa: F811
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = start_page(ckpts.classes, tmp_path / "demo", port)
    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#sample"))

        def status() -> str:
            return browser.find_element(By.CSS_SELECTOR, "#status").text

        def typed(element: str, value: str) -> None:
            field = browser.find_element(By.CSS_SELECTOR, f"#{element} input")
            field.clear()
            field.send_keys(value)

        typed("seed", "5")
        typed("num", "4")
        browser.find_element(By.CSS_SELECTOR, "#sample").click()
        wait.until(lambda b: status().startswith(("done", "error")))
        assert status().startswith("done"), status()
        grid = tmp_path / "demo" / "0001" / "out" / "grid.png"
        image = browser.find_element(By.CSS_SELECTOR, "#grid img")
        wait.until(lambda b: int(image.get_attribute("naturalWidth") or 0) > 0)
        with Image.open(grid) as written:
            assert (int(image.get_attribute("naturalWidth")), int(image.get_attribute("naturalHeight"))) == \
                written.size
        shown = browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
        assert "--seed 5" in shown and "--num 4" in shown
        browser.save_screenshot(str(tmp_path / "page.png"))

        browser.find_element(By.CSS_SELECTOR, "#class input").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#class li[aria-label='ring']"))
        browser.find_element(By.CSS_SELECTOR, "#class li[aria-label='ring']").click()
        browser.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Complete']").click()
        upload = tmp_path / "notes.txt"
        upload.write_text("not a picture")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image_upload input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#image_upload input[type=file]").send_keys(str(upload))
        time.sleep(1)  # the upload reaches the server before the click
        browser.find_element(By.CSS_SELECTOR, "#complete").click()
        wait.until(lambda b: status().startswith("error"))
        assert "notes" in status()

        browser.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Sample']").click()
        browser.find_element(By.CSS_SELECTOR, "#sample").click()
        wait.until(lambda b: status().startswith(("done", "error")) and "0001" not in status())
        assert status().startswith("done"), status()
        assert (tmp_path / "page.png").stat().st_size > 0
    finally:
        browser.quit()
        server.kill()
        server.wait()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
