"""How every ``python -m`` entry point ends: an expected failure is one line, never a traceback.

Each command line turns the failures it knows into its own messages and exit statuses; this is
the net under them, shared by every ``__main__``:

* a :class:`~pipeline.errors.PipelineError` -> ``error: <message>`` and its ``exit_code``;
* Ctrl-C or a second SIGTERM (the handlers raise KeyboardInterrupt to force an exit) ->
  ``interrupted``, status 130;
* the database or the broker failing in a way no layer translated (SQLAlchemy's
  OperationalError/InterfaceError: the database unreachable or gone; confluent-kafka's
  KafkaException) -> one line saying what failed, passwords masked, status 1;
* anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from pipeline.errors import PipelineError
from pipeline.lifetime import exit_now
from pipeline.settings import mask_url

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def run_main(module: str, argv: list[str] | None = None) -> NoReturn:
    """Import ``module`` and exit with what its ``main(argv)`` returns, or with the status of
    the expected failure it raised. Imported here rather than by the caller so that a Ctrl-C
    during slow imports (torch, MLflow) is one line too."""
    status = exit_status(lambda: importlib.import_module(module).main(argv))
    if status == EXIT_INTERRUPTED and _threads_left():
        # Forced: the finally blocks on the way out have stopped the children; the threads
        # still waiting (an order's) are not joined, as the interpreter's exit would.
        exit_now(status)
    raise SystemExit(status)


def _threads_left() -> bool:
    """Whether threads the interpreter's exit would wait for are still running."""
    return any(thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
               for thread in threading.enumerate())


def exit_status(main: Callable[[], int | None]) -> int:
    """Run ``main``; its status, or an expected failure's, told in one line on stderr."""
    try:
        return main() or 0
    except PipelineError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _quiet_from_now_on()
        _say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = infrastructure_failure(exc)
        if message is None:
            raise  # a bug: its traceback is what helps
        _say(f"error: {message}")
        return EXIT_FAILED


def infrastructure_failure(exc: BaseException) -> str | None:
    """One line for a database or broker failure that reached the top untranslated; None for
    anything else. The libraries are looked up, not imported: a failure of theirs means they
    are loaded, and a command that never used them should not pay for importing them."""
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(exc, (sqlalchemy_exc.OperationalError,
                                                       sqlalchemy_exc.InterfaceError)):
        return f"database unreachable: {_first_line(exc.orig if exc.orig is not None else exc)}"
    confluent_kafka = sys.modules.get("confluent_kafka")
    if confluent_kafka is not None and isinstance(exc, confluent_kafka.KafkaException):
        error = exc.args[0] if exc.args else None
        text = error.str() if isinstance(error, confluent_kafka.KafkaError) else str(exc)
        return f"Kafka: {_first_line(text)}"
    return None


def _first_line(detail: object) -> str:
    lines = str(detail).strip().splitlines()
    return mask_url(lines[0].strip() if lines else type(detail).__name__)


def _quiet_from_now_on() -> None:
    """The user asked to leave: a further Ctrl-C or SIGTERM while the interpreter exits ends
    the process at once, rather than raising KeyboardInterrupt where only a traceback can
    come of it (thread joins, atexit handlers). Children are stopped on the way out already
    (or by their parent-death signal)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_DFL)
        except ValueError:  # not the main thread: nothing installed here to undo
            pass


def _say(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
