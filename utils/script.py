"""What both training scripts do around their loop: the command line, reading and checking the config,
starting and stopping torch.distributed, and reporting user errors as one paragraph."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch

from utils.checkpoint import CheckpointError
from utils.config import ConfigError, describe, load_config
from utils.device import device_type_of
from utils.distributed import DistInfo, DistributedSetupError, init_distributed, shutdown_distributed
from utils.loop import TrainingStopped
from utils.run_dir import RunDirError, claim_run_dir, default_run_dir


def training_parser(description: str, config_cls: type) -> argparse.ArgumentParser:
    """The command line both training scripts share: config, run folder, resume, overrides."""
    parser = StrictParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    parser.add_argument("--force", action="store_true",
                        help="start over in an existing run folder, or resume with a changed config")
    parser.add_argument("--describe-config", action=_DescribeConfig, config_cls=config_cls,
                        help="print every config key with its default and meaning, then exit")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=1e-4 data.root=/data")
    return parser


class _DescribeConfig(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, config_cls: type, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.config_cls = config_cls

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(describe(self.config_cls))
        parser.exit()


class StrictParser(argparse.ArgumentParser):
    """An ArgumentParser on which an option given twice is an error: plain argparse keeps the last one without
    a word, so two ``--config`` flags would silently drop the first file. Subcommand parsers are strict too."""

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        if names and str(names[0]).startswith("-"):
            given = kwargs.get("action", "store")
            if given in ("store", "store_true"):
                kwargs["action"] = _StoreOnce
                if given == "store_true":
                    kwargs.update(nargs=0, const=True, default=kwargs.get("default", False))
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        parsed.__dict__.pop(_GIVEN, None)
        return parsed, extras


_GIVEN = "_options_given"  # the options a parse has met so far, kept on its namespace while it runs


class _StoreOnce(argparse.Action):
    """``store`` (or ``store_true`` with ``nargs=0``) that refuses a second occurrence of its option."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given: set[str] = namespace.__dict__.setdefault(_GIVEN, set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} was given twice; give it once.")
        given.add(self.dest)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def run_training(parser: argparse.ArgumentParser, config_cls: type, train: Callable[..., None],
                 argv: list[str] | None, user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Parse the command line, load and check the config, and call ``train(cfg, run_dir, args, info)``
    inside torch.distributed (when launched by torchrun) while holding the run folder (see
    :func:`utils.run_dir.claim_run_dir`), reporting user errors without a traceback."""
    with clean_exit(*user_errors):
        args = parser.parse_intermixed_args(argv)
        cfg = load_config(config_cls, args.config, args.overrides)
        for warning in cfg.validate():
            print(f"warning: {warning}", file=sys.stderr)
        info: DistInfo = init_distributed(device_type_of(cfg.train.device), cfg.train.dist_timeout)
        run_dir = default_run_dir(args.config, args.run_dir)
        try:
            with claim_run_dir(run_dir, info):
                train(cfg, run_dir, args, info)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_note(run_dir / "checkpoints" / "last.pt")) from None
        finally:
            shutdown_distributed()


class Interrupted(KeyboardInterrupt):
    """A training stopped at once by a second signal; its message says what was saved."""


def _interrupted_note(last: Path) -> str:
    if last.is_file():
        return (f"interrupted before a checkpoint could be saved; the newest checkpoint, {last}, is intact. "
                f"Continue with --resume.")
    return "interrupted before the first checkpoint was saved, so there is nothing to resume; run the command again."


@contextlib.contextmanager
def clean_exit(*user_errors: type[Exception]) -> Iterator[None]:
    """Report errors a user can fix as one paragraph on stderr instead of a traceback.

    Config, checkpoint, run-folder, process-group and the given ``user_errors`` exit with code 2; a run
    stopped by non-finite steps exits with 1; a second Ctrl-C with 130.
    """
    try:
        yield
    except TrainingStopped as err:
        _exit(1, f"training stopped: {err}")
    except (ConfigError, CheckpointError, RunDirError, DistributedSetupError, *user_errors) as err:
        _exit(2, f"error: {err}")
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        _exit(2, f"error: out of memory ({_first_line(err)}). The settings ask for more memory than this machine has: "
                 f"lower the batch size (train.batch_size, --batch-size), the model's sizes (model.ch, "
                 f"model.codebook_size, model.embed_dim, transformer.n_embd, ...), data.image_size or "
                 f"data.num_samples; on a GPU, train.precision=bf16 halves the activations.")
    except KeyboardInterrupt as err:
        _exit(130, str(err) if isinstance(err, Interrupted) else "interrupted.")


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: host memory (the CPU allocator raises a plain RuntimeError) or GPU memory."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _exit(code: int, message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
