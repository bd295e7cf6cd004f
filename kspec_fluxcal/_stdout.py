"""A command's stdout whose reader may leave (``kspec-fluxcal ... | head``): the work goes on
and its exit status stays the work's."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["stdout_may_close"]


class _PipeSafeStdout:
    """sys.stdout whose reader may leave: once the pipe is broken (``| head`` has read
    enough), what is still written is discarded, so that the work goes on and the exit status
    is the work's."""

    def __init__(self, stream):
        self._stream = stream
        self._broken = False

    def write(self, text):
        self._guarded(self._stream.write, text)
        return len(text)

    def flush(self):
        self._guarded(self._stream.flush)

    def _guarded(self, method, *args):
        if self._broken:
            return
        try:
            method(*args)
        except BrokenPipeError:
            self._broken = True
            self._to_devnull()

    def _to_devnull(self):
        """Point the stream's file descriptor, when it has one, at os.devnull: what its
        buffer still holds is flushed at exit, which would report the broken pipe again."""
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: in memory
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_may_close():
    """sys.stdout as a :class:`_PipeSafeStdout` while the command runs, flushed at its end: a
    broken pipe found by the interpreter's own flush at exit would be reported, and change
    the exit status."""
    original = sys.stdout
    sys.stdout = guarded = _PipeSafeStdout(original)
    try:
        yield
    finally:
        guarded.flush()
        if sys.stdout is guarded:
            sys.stdout = original
