"""No traceback for a user's mistake: Prefect's engine logs a failed task or flow run with its traceback (ERROR,
loggers `prefect.task_runs` and `prefect.flow_runs`); when the exception is a UserError its message is the whole
story, and the CLI prints it. Any other exception is a crash and keeps its traceback, in the terminal and the UI.
"""

from __future__ import annotations

import logging

from flywheel.core.errors import UserError

PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class UserErrorTracebackFilter(logging.Filter):
    """Keeps every record; takes the traceback off those whose exception is a UserError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Install the filter on Prefect's run loggers, once per process. Logging config keeps a logger's filters, so
    this may run before Prefect is imported and configures its logging."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorTracebackFilter) for f in logger.filters):
            logger.addFilter(UserErrorTracebackFilter())
