"""The one exception type every pipeline layer raises for mistakes a user can fix.

It lives at the bottom of the import graph so that tracking, serving and the task stores can raise it without
importing the CLI; the CLI prints its message without a traceback and exits 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback and exits 2."""
