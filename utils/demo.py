"""The page of ``generate.py demo``: a Gradio form in front of ``generate.py sample`` and ``generate.py complete``.

Every click builds one ``generate.py`` command from the form, shows it, and runs it on the prior the demo loaded
once (``Runner``): the page is a front end to the command line, not a second sampler, so the command it shows
writes the same grid. Uploads and chosen examples are copied into the run's folder first, where the command reads
them. While the command samples, the partial grid is shown every few tokens, with the count of tokens done.
A request the command refuses (a bad upload, a class the prior lacks) ends in its message on the page, and the
server goes on serving.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import shlex
import shutil
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INSTALL_HINT = ("the demo page needs Gradio, an optional dependency: pip install -r requirements-demo.txt "
                "(in the environment that runs generate.py).")
EVERY_CLASS = "every class in turn"
NO_EXAMPLE = "(none)"
MAX_SAMPLES = 16
PAGE_CSS = "#grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"

Preview = Callable[[np.ndarray, int, int], None]  # (partial grid HxWx3 uint8, tokens done, tokens in all)
Runner = Callable[[list[str], int, Preview], Path]  # (command's arguments, preview every N tokens) -> grid.png


class RequestError(Exception):
    """A request that cannot be carried out; its message is shown on the page."""


@dataclasses.dataclass
class DemoModel:
    """What the page shows and asks for, read off the loaded prior."""

    checkpoint: str
    summary: str
    condition: str  # the prior's condition kind: none, class, segmentation, depth, lowres or coord
    maps: bool  # the prior samples from condition maps (segmentation, depth or low-res images)
    classes: list[str]  # names of the classes of a class-conditional prior, else empty
    guided: bool  # classifier-free guidance applies (a conditional prior)
    sizes: list[int]  # output sizes in pixels, the training size first
    defaults: dict[str, Any]  # the checkpoint's temperature, top_k (0 = off), top_p (1 = off) and cfg_scale
    examples: Path | None  # folder of example inputs: images/NAME.png, and conditions/NAME.png for map priors
    example_names: list[str]
    device: str = "auto"


@dataclasses.dataclass
class Request:
    """One click's form values."""

    mode: str  # sample or complete
    class_name: str
    num: int
    seed: int
    decoding: str  # sample or argmax
    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float
    every: int
    size: int
    condition_upload: str | None
    condition_example: str
    image_upload: str | None
    image_example: str
    keep: float


def next_run_folder(root: Path) -> Path:
    """``root/0001``, ``root/0002``, ...: the first number not taken."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    return root / f"{max(taken, default=0) + 1:04d}"


def command(model: DemoModel, request: Request, folder: Path) -> list[str]:
    """The ``generate.py`` arguments for ``request``, writing into ``folder``; the inputs it needs are copied into
    ``folder/inputs`` first."""
    if not 1 <= request.num <= MAX_SAMPLES:
        raise RequestError(f"the number of samples must be between 1 and {MAX_SAMPLES}, got {request.num}.")
    argv = [request.mode, "--checkpoint", model.checkpoint, "--out", str(folder / "out"), "--seed", str(request.seed)]
    if model.device != "auto":
        argv += ["--device", model.device]
    argmax = request.decoding == "argmax"
    argv += ["--temperature", _number(request.temperature), "--top-k", "1" if argmax else str(request.top_k),
             "--top-p", _number(request.top_p)]
    if model.guided:
        argv += ["--cfg-scale", _number(request.cfg_scale)]
    if model.classes and request.class_name != EVERY_CLASS:
        if request.class_name not in model.classes:
            raise RequestError(f"unknown class {request.class_name!r}; choose one of the list.")
        argv += ["--class", str(model.classes.index(request.class_name))]
    inputs = folder / "inputs"
    if request.mode == "complete":
        if model.classes and request.class_name == EVERY_CLASS:
            raise RequestError("completion of a class-conditional prior needs one class: choose it in the class list.")
        _copy_image(model, request.image_upload, request.image_example, inputs)
        return argv + ["--input", str(inputs), "--keep", _number(request.keep), "--samples-per-input",
                       str(request.num)]
    if request.size != model.sizes[0]:
        argv += ["--size", str(request.size)]
    if model.maps:
        _copy_condition(model, request, inputs)
        return argv + ["--condition", str(inputs), "--samples-per-condition", str(request.num)]
    return argv + ["--num", str(request.num)]


def _number(value: float) -> str:
    return f"{float(value):g}"


def _copy_condition(model: DemoModel, request: Request, inputs: Path) -> None:
    """The condition map to sample from, in ``inputs``: an uploaded map as it is, or an example with its image."""
    if request.condition_upload:
        _copy_upload(Path(request.condition_upload), inputs / "conditions")
    elif request.condition_example != NO_EXAMPLE:
        _copy_example(model, request.condition_example, inputs)
    else:
        raise RequestError(f"this prior samples from {model.condition} maps: upload one, or choose an example.")


def _copy_image(model: DemoModel, upload: str | None, example: str, inputs: Path) -> None:
    """The image to complete, in ``inputs``: in ``inputs/images`` for a map prior (whose map goes beside it), else
    directly in ``inputs``."""
    if upload:
        _copy_upload(Path(upload), inputs / "images" if model.maps else inputs)
    elif example != NO_EXAMPLE:
        _copy_example(model, example, inputs)
    else:
        raise RequestError("upload the image to complete, or choose an example.")


def _copy_example(model: DemoModel, name: str, inputs: Path) -> None:
    if model.examples is None or name not in model.example_names:
        raise RequestError(f"unknown example {name!r}; choose one of the list.")
    image = model.examples / "images" / f"{name}.png"
    _copy(image, inputs / "images" if model.maps else inputs, name)
    condition = model.examples / "conditions" / f"{name}.png"
    if condition.is_file():
        _copy(condition, inputs / "conditions", name)


def _copy_upload(upload: Path, folder: Path) -> None:
    """An uploaded picture, checked to be one, under its own name."""
    try:
        with Image.open(upload) as image:
            image.verify()
    except (OSError, SyntaxError) as err:
        raise RequestError(f"the upload '{upload.name}' is not a picture that can be read ({err}); upload a PNG or "
                           f"JPEG.") from err
    _copy(upload, folder, upload.stem)


def _copy(source: Path, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / f"{stem}{source.suffix.lower() or '.png'}")


def shown_command(argv: list[str]) -> str:
    return "python generate.py " + shlex.join(argv)


def generate(model: DemoModel, runner: Runner, out: Path, mode: str, *values: Any) -> Iterator[tuple]:
    """The click handler: (image, status, command, download) updates, streamed while the command samples."""
    request = Request(mode, *values)
    try:
        folder = next_run_folder(out)
        argv = command(model, request, folder)
    except (RequestError, OSError) as err:
        yield None, f"**error:** {err}", "", None
        return
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            events.put(("done", runner(argv, max(1, int(request.every)),
                                       lambda image, done, total: events.put(("preview", image, done, total)))))
        except RequestError as err:
            events.put(("error", str(err)))
        except Exception as err:  # a bug: keep serving, say so on the page and in the server's log
            traceback.print_exc()
            events.put(("error", f"unexpected {type(err).__name__}: {err} (the server's log has the traceback)"))

    threading.Thread(target=work, daemon=True).start()
    text = shown_command(argv)
    while True:
        kind, *payload = _latest(events)
        if kind == "preview":
            image, done, total = payload
            yield image, f"sampling: {done} / {total} tokens", text, None
        elif kind == "error":
            yield None, f"**error:** {payload[0]}", text, None
            return
        else:
            grid = str(payload[0])
            yield grid, f"done: wrote {grid}", text, grid
            return


def _latest(events: queue.Queue) -> tuple:
    """The next event, skipping previews that a later one already replaces."""
    event = events.get()
    while event[0] == "preview":
        try:
            event = events.get_nowait()
        except queue.Empty:
            break
    return event


def build_page(model: DemoModel, runner: Runner, out: Path) -> Any:
    """The Gradio page (``gradio.Blocks``) for ``model``; each click runs one command through ``runner``."""
    import gradio as gr

    examples = [NO_EXAMPLE, *model.example_names]
    with gr.Blocks(title="VQGAN demo", analytics_enabled=False) as page:
        gr.Markdown(f"## VQGAN prior demo\n`{model.checkpoint}`: {model.summary}")
        with gr.Row():
            with gr.Column(scale=1):
                class_name = gr.Dropdown([EVERY_CLASS, *model.classes], value=EVERY_CLASS, label="class",
                                         visible=bool(model.classes), elem_id="class")
                with gr.Row():
                    num = gr.Number(8, label=f"samples (1-{MAX_SAMPLES})", precision=0, minimum=1,
                                    maximum=MAX_SAMPLES, elem_id="num")
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                with gr.Tab("Sample"):
                    size = gr.Dropdown(model.sizes, value=model.sizes[0], label="output size in pixels (beyond the "
                                       "training size the window slides)", elem_id="size")
                    condition_upload = gr.File(label=f"{model.condition} map (PNG)", type="filepath",
                                               visible=model.maps, elem_id="condition_upload")
                    condition_example = gr.Dropdown(examples, value=examples[1] if model.maps and len(examples) > 1
                                                    else NO_EXAMPLE, label=f"or a {model.condition} map of the "
                                                    "test split", visible=model.maps, elem_id="condition_example")
                    sample_button = gr.Button("Sample", variant="primary", elem_id="sample")
                with gr.Tab("Complete"):
                    image_upload = gr.File(label="image to complete", type="filepath", elem_id="image_upload")
                    image_example = gr.Dropdown(examples, value=examples[1] if len(examples) > 1 else NO_EXAMPLE,
                                                label="or an image of the test split", elem_id="image_example")
                    keep = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="share of token rows kept",
                                     elem_id="keep")
                    complete_button = gr.Button("Complete", variant="primary", elem_id="complete")
                decoding = gr.Radio(["sample", "argmax"], value="sample", label="decoding", elem_id="decoding")
                temperature = gr.Slider(0.1, 2.0, value=model.defaults["temperature"], step=0.05,
                                        label="temperature", elem_id="temperature")
                with gr.Row():
                    top_k = gr.Number(model.defaults["top_k"], label="top-k (0 = off)", precision=0, minimum=0,
                                      elem_id="top_k")
                    every = gr.Number(8, label="show the picture every N tokens", precision=0, minimum=1,
                                      elem_id="every")
                top_p = gr.Slider(0.05, 1.0, value=model.defaults["top_p"], step=0.05, label="top-p (1 = off)",
                                  elem_id="top_p")
                cfg_scale = gr.Slider(1.0, 10.0, value=model.defaults["cfg_scale"], step=0.5,
                                      label="classifier-free guidance scale", visible=model.guided, elem_id="cfg")
            with gr.Column(scale=2):
                image = gr.Image(label="samples", type="filepath", interactive=False, height=420, elem_id="grid")
                status = gr.Markdown("", elem_id="status")
                shown = gr.Textbox(label="the command that writes this grid", interactive=False, elem_id="command")
                download = gr.DownloadButton("Download the grid (PNG)", elem_id="download")
        form = [class_name, num, seed, decoding, temperature, top_k, top_p, cfg_scale, every, size, condition_upload,
                condition_example, image_upload, image_example, keep]
        outputs = [image, status, shown, download]
        for button, mode in ((sample_button, "sample"), (complete_button, "complete")):
            button.click(functools.partial(generate, model, runner, out, mode), form, outputs)
    return page
