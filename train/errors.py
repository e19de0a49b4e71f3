"""User mistakes vs bugs at the command line: `user_errors()` turns the errors that mean "the input is wrong"
(a config key, a file that is missing / corrupt / unsafe, data that does not fit, a folder in use or not
writable, a full disk) into one line on stderr and exit status 2. Anything else is a bug and keeps its
traceback. `--debug` (or VAVAE_DEBUG=1) keeps the traceback for user mistakes too.

    def main(argv=None):
        args = parser.parse_args(argv)
        with user_errors(args.debug):
            ...
"""
import contextlib
import os
import sys


def user_error_types():
    from modeling.checkpoint import CheckpointMismatchError
    from modeling.safe_load import CheckpointLoadError

    from .checkpoint import DiskFullError, NotWritableError, ResumeConfigError, RunLockedError
    from .config import ConfigError
    from .data import DataError
    return (ConfigError, DataError, CheckpointLoadError, CheckpointMismatchError, ResumeConfigError, RunLockedError,
            NotWritableError, DiskFullError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def one_line(exc):
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = " ".join(exc.args[0].split())  # KeyError's str() quotes its message
    return text or type(exc).__name__


def add_debug_arg(parser):
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


@contextlib.contextmanager
def user_errors(debug=False, prefix="error"):
    """Exit 2 with `error: <one line>` on a user mistake (see module docstring)."""
    try:
        yield
    except user_error_types() as e:
        if debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
