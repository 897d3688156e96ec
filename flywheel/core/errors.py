"""The errors a user can cause and fix: the CLI prints their message alone, with no traceback.

Any other exception is a crash and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a bad spec, unreadable or invalid data, a server that will not start); its
    message says what and how."""
