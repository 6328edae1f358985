"""One status line on stderr, shared by the commands that show progress.

On a terminal the line is redrawn in place (padded so a shorter line clears a longer one);
otherwise each due update is printed as its own line, so logs stay readable.
"""

from __future__ import annotations

import sys


def bar(done: int, total: int, width: int) -> str:
    """``[####....]``-style fill of ``width`` characters for ``done / total``."""
    filled = width * done // max(total, 1)
    return "#" * filled + "." * (width - filled)


class StatusLine:
    """Writes status lines to ``stream`` (stderr, looked up when the line is made)."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self._width = 0

    def show(self, line: str, *, final: bool = False, due: bool = True) -> None:
        """Show ``line``; ``final`` ends a redrawn line; off a terminal only ``due`` lines print."""
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = 0 if final else len(line)
        elif due or final:
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()
