"""What every experiment script shares: one-line errors and timestamped progress lines."""

import contextlib
import sys
import time

_START = time.time()

# Errors that mean "the user asked for something that cannot run": print one line, exit 1.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, ModuleNotFoundError, KeyError)


def log(msg: str) -> None:
    """Prints one progress line with the elapsed time, flushed at once."""
    print(f"[{time.time() - _START:7.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def one_line_errors():
    """Turns bad input (bad flags, missing files, unwritable dirs) into `error: ...`, exit 1.

    Work already finished is on disk (the scripts write each part as it completes), so
    nothing computed is lost; the message says what to change.
    """
    try:
        yield
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished parts are saved; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.exit(130)
