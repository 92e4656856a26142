"""A short, readable console for long commands (``metalstm demo``): its own lines, progress bars, and a log file
for everything else the process and its children write.

Ray, Serve and Ray Data write from C++ threads, Python loggers, forwarded worker output and child processes,
straight to file descriptors 1 and 2; redirecting the descriptors themselves is the only way to catch all of it.
The console keeps a duplicate of the original stdout for its own lines.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

Poll = Callable[[], tuple[int | None, str]]  # (steps done or None, a short note)


class Console:
    """The screen of a command. With ``log_path``, fds 1 and 2 go to that file until the console is closed."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self._saved: tuple[int, int] | None = None
        self.out: TextIO = sys.stdout

    def __enter__(self) -> Console:
        if self.log_path is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._saved = (os.dup(1), os.dup(2))
            self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Give fds 1 and 2 back (what still writes to them afterwards reaches the terminal again)."""
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        self.out.close()
        self.out = sys.stdout

    @property
    def tty(self) -> bool:
        return self.out.isatty()

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, label: str, total: int | None = None, poll: Poll | None = None, every_s: float = 30.0,
                 note: str = "") -> Progress:
        """A status line for a long step (see :class:`Progress`)."""
        progress = Progress(self, label, total, poll, every_s)
        progress.note = note
        return progress

    def log_tail(self, lines: int = 15) -> list[str]:
        """The last lines of the log file, for a failure's screen."""
        if self.log_path is None or not self.log_path.exists():
            return []
        sys.stdout.flush()
        sys.stderr.flush()
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 20000))
            text = f.read().decode("utf-8", "replace")
        return [s.rstrip()[:200] for s in text.replace("\r", "\n").splitlines() if s.strip()][-lines:]


class Progress:
    """One status line for a long step, as a context manager that ends with :meth:`done`.

    On a terminal it is redrawn in place twice a second (a bar when ``total`` is known, else elapsed time);
    anywhere else (a pipe, CI) it prints a line every ``every_s`` seconds and the final one, so a captured
    log shows progress in a handful of lines. ``poll`` is called from the drawing thread for the steps done
    and a note; an exception there keeps the previous state (the source may not exist yet).
    """

    WIDTH = 24

    def __init__(self, console: Console, label: str, total: int | None, poll: Poll | None, every_s: float) -> None:
        self.console, self.label, self.total, self.poll, self.every_s = console, label, total, poll, every_s
        self.count: int | None = None
        self.note = ""
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="console-progress", daemon=True)
        self._finished = False

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._finished:  # left by an exception: end the line as it stands
            self.done(f"{self._status()}  (stopped)")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, count: int | None = None, note: str | None = None) -> None:
        with self._lock:
            if count is not None:
                self.count = count
            if note is not None:
                self.note = note

    def _status(self) -> str:
        parts = [self.label]
        if self.total:
            done = min(self.count or 0, self.total)
            filled = round(self.WIDTH * done / self.total)
            parts.append(f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}")
        if self.note:
            parts.append(self.note)
        parts.append(f"{self.elapsed:.0f} s")
        return "  ".join(parts)

    def _draw(self, final: str | None = None) -> None:
        if self.console.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            text = final if final is not None else self._status()
            self.console.out.write("\r" + text[:width].ljust(width) + ("\n" if final is not None else ""))
            self.console.out.flush()
        elif final is not None:
            self.console.line(final)
        else:
            self.console.line(self._status())

    def _loop(self) -> None:
        last_line = time.monotonic()
        while not self._stop.wait(0.5):
            if self.poll is not None:
                try:
                    count, note = self.poll()
                    self.update(count, note)
                except Exception:  # the source may not exist yet: keep the last state
                    pass
            with self._lock:
                if self._stop.is_set():
                    return
                if self.console.tty:
                    self._draw()
                elif time.monotonic() - last_line >= self.every_s:
                    self._draw()
                    last_line = time.monotonic()

    def done(self, text: str) -> None:
        """End the step with its result line (which replaces the bar on a terminal)."""
        self._stop.set()
        with self._lock:
            self._finished = True
            self._draw(final=text)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
