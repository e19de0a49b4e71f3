"""User mistakes vs bugs at the command line: `user_errors()` turns the errors that mean "the input is wrong"
(a config key, a file that is missing / corrupt / unsafe, data that does not fit, a folder in use or not
writable, a full disk) into one line on stderr and exit status 2. Anything else is a bug and keeps its
traceback. `--debug` (or VAVAE_DEBUG=1) keeps the traceback for user mistakes too.

    def main(argv=None):
        args = parser.parse_args(argv)
        with user_errors(args.debug):
            ...
"""
import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Optional


def user_error_types() -> tuple[type[BaseException], ...]:
    from modeling.checkpoint import CheckpointMismatchError
    from modeling.safe_load import CheckpointLoadError

    from .checkpoint import DiskFullError, NotWritableError, ResumeConfigError, RunLockedError
    from modeling.config import ConfigError
    from .data import DataError
    return (ConfigError, DataError, CheckpointLoadError, CheckpointMismatchError, ResumeConfigError, RunLockedError,
            NotWritableError, DiskFullError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = " ".join(exc.args[0].split())  # KeyError's str() quotes its message
    return text or type(exc).__name__


def add_debug_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


@contextlib.contextmanager
def user_errors(debug: bool = False, prefix: str = "error") -> Iterator[None]:
    """Exit 2 with `error: <one line>` on a user mistake (see module docstring)."""
    try:
        yield
    except user_error_types() as e:
        if debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def trainer_main(module: str, doc: Optional[str], schema: type, run: Callable[[Any], Any],
                 argv: Optional[list[str]] = None, extra_user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """The command line both trainers share (`python -m train.train_dit` / `train.train_vae`): the config from
    YAML + overrides (a mistake: one line, exit 2), --print-config, --debug, then `run(cfg)`. A user mistake
    while running exits 2 in one line; too many non-finite steps (NonFiniteError) exits 1 after its checkpoint."""
    import logging

    import torch.distributed as dist

    from modeling.config import ConfigError, add_config_args, config_from_args, dump_config
    from .guard import NonFiniteError

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    add_config_args(parser, schema=schema)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(schema, args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(cfg)
    except (*user_error_types(), *extra_user_errors) as e:  # the input is wrong: one line, exit 2
        if args.debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
