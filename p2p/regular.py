"""Reading a small file that someone else may have replaced.

The client keeps small files of its own beside others' (a peer-list cache,
a partial download's state file), in folders anyone may write to.  What
is found at such a path is read only if it is a regular file, never
through a symbolic link and never by waiting: a FIFO put in its place
would block a plain ``open`` until somebody writes to it.
"""

from __future__ import annotations

import errno
import os
import stat


def read_regular_file(path: str, limit: int) -> bytes:
    """
    Up to C{limit} bytes of the regular file at C{path}.

    :raise FileNotFoundError: nothing is there.
    :raise OSError: a symbolic link, a FIFO or anything but a regular file
        (C{EINVAL}, "not a regular file"), or it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as stream:
            return stream.read(limit)
    finally:
        os.close(fd)
