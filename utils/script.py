"""What both training scripts do around their loop: the command line, reading and checking the config,
starting and stopping torch.distributed, and reporting user errors as one paragraph."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator, NoReturn

from utils.checkpoint import CheckpointError
from utils.config import ConfigError, describe, load_config
from utils.device import device_type_of
from utils.distributed import DistInfo, init_distributed, shutdown_distributed
from utils.loop import TrainingStopped
from utils.run_dir import RunDirError, claim_run_dir, default_run_dir


def training_parser(description: str, config_cls: type) -> argparse.ArgumentParser:
    """The command line both training scripts share: config, run folder, resume, overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        info: DistInfo = init_distributed(device_type_of(cfg.train.device))
        run_dir = default_run_dir(args.config, args.run_dir)
        try:
            with claim_run_dir(run_dir, info):
                train(cfg, run_dir, args, info)
        finally:
            shutdown_distributed()


@contextlib.contextmanager
def clean_exit(*user_errors: type[Exception]) -> Iterator[None]:
    """Report errors a user can fix as one paragraph on stderr instead of a traceback.

    Config, checkpoint, run-folder and the given ``user_errors`` exit with code 2; a run stopped
    by non-finite steps exits with 1; a second Ctrl-C with 130.
    """
    try:
        yield
    except TrainingStopped as err:
        _exit(1, f"training stopped: {err}")
    except (ConfigError, CheckpointError, RunDirError, *user_errors) as err:
        _exit(2, f"error: {err}")
    except KeyboardInterrupt:
        _exit(130, "interrupted before a checkpoint could be saved; the previous checkpoints are intact. "
                   "Continue with --resume.")


def _exit(code: int, message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
