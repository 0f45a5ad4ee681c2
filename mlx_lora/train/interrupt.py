"""Ctrl-C as a request: the current update finishes, then the loop saves and stops.

Python runs signal handlers only between bytecodes, so during a long compiled step a handler
would wait for the step. A watcher thread reads the signal wakeup fd instead (MLX releases
the GIL while it computes), so a second Ctrl-C ends the process at once, mid-step. Every file
is written atomically, so the last checkpoint stays whole.
"""

import os
import signal
import sys
import threading

STOP_NOW_STATUS = 130


class StopRequest:
    """While active, the first SIGINT sets `requested`; a second one ends the process at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def _handle(self, signum, frame):
        self.requested = True  # the watcher has already said so

    def _watch(self, read_fd: int) -> None:
        interrupts = 0
        try:
            while (byte := os.read(read_fd, 1)) and byte[0] != 0:  # 0: __exit__ says end
                if byte[0] != signal.SIGINT:
                    continue
                interrupts += 1
                self.requested = True
                if interrupts == 1:
                    print("\nstopping after this step to save a checkpoint (Ctrl-C again to "
                          "stop now)", file=sys.stderr, flush=True)
                else:
                    print("\nstopped at once; the last complete checkpoint is intact "
                          "(--resume)", file=sys.stderr, flush=True)
                    os._exit(STOP_NOW_STATUS)
        finally:
            os.close(read_fd)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread receives signals; stop= serves other threads
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._previous = signal.signal(signal.SIGINT, self._handle)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._pipe is None:
            return False
        signal.signal(signal.SIGINT, self._previous)
        signal.set_wakeup_fd(self._previous_fd)
        write_fd = self._pipe[1]
        os.write(write_fd, b"\0")  # the watcher ends and closes the read end
        os.close(write_fd)
        self._pipe = None
        return False
