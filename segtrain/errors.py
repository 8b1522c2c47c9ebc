"""The one marker for mistakes a user can fix (a config field, a flag, a file, a folder).

Every error class that describes such a mistake derives from :class:`UserError` (itself a ``ValueError``,
so existing ``except ValueError`` code keeps working). ``segtrain <command>`` prints a ``UserError`` as
one line, ``segtrain <command>: error: <message>``, and exits with status 2; anything else is a bug
and keeps its traceback. ``--debug`` shows the traceback of a ``UserError`` too.
"""

from __future__ import annotations

__all__ = ["EXIT_USER_ERROR", "UserError"]

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A value, flag, file or folder that cannot be used; the message names it and, where it helps, the fix."""
