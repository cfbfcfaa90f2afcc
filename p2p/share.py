"""A peer's share folder: safe name resolution.

Every name a client sends is untrusted.  ``ShareFolder.open`` accepts only
plain relative names whose real path stays inside the folder, opens them
without following a final symlink and without blocking on FIFOs, and accepts
only regular files.  What the folder holds, and the root of each file's
content, is the share index's business (L{p2p.index.ShareIndex}): it walks
the folder itself, hashes in its own pool, and opens every file it hashes
through ``open``, so one set of rules decides what can ever be read.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from p2p.wire import Code, WireError

# twistd's pid file and (rotated) log files, at the top of the share.
TWISTD_FILES = re.compile(r"twistd\.pid|twistd\.log(\.[0-9_]+)?")


@dataclass
class OpenedFile:
    """A file opened for serving: the descriptor is ours to close."""

    name: str
    fd: int
    size: int
    identity: tuple[int, int, int, int]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShareFolder:
    """
    The files one peer serves.

    :param root: the folder; only files inside it are ever read.
    :param include_hidden: also serve names with a component starting with
        a dot.
    """

    def __init__(self, root: str, include_hidden: bool = False) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"share folder {root!r} is not a directory")
        self.include_hidden = include_hidden

    def _check_name(self, name: str) -> list[str]:
        if "\\" in name or "\x00" in name:
            raise WireError(Code.FORBIDDEN, "name must not contain \\ or NUL")
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise WireError(
                Code.FORBIDDEN, "name must be relative, without . or .. or //"
            )
        if not self.include_hidden and any(p.startswith(".") for p in parts):
            raise WireError(Code.FORBIDDEN, "hidden files are not shared")
        if len(parts) == 1 and TWISTD_FILES.fullmatch(parts[0]):
            # twistd writes these into its working folder, which is the
            # default share: a peer must not hand out its own pid and logs.
            raise WireError(Code.FORBIDDEN, "twistd's own files are not shared")
        return parts

    def _inside(self, path: str) -> str | None:
        """The share-relative form of real path C{path}, or None if outside."""
        relative = os.path.relpath(path, self.root)
        # Compare whole components: "..notes" is a file inside the folder.
        if relative in (os.curdir, os.pardir) or relative.startswith(
            os.pardir + os.sep
        ):
            return None
        return relative

    def open(self, name: str) -> OpenedFile:
        """
        Open C{name} for serving.

        :raise WireError: 403 for names that escape the folder or are not
            regular files, 404 for missing files.
        """
        self._check_name(name)
        real = os.path.realpath(os.path.join(self.root, *name.split("/")))
        relative = self._inside(real)
        if relative is None:
            raise WireError(Code.FORBIDDEN, "name leads outside the share folder")
        if not self.include_hidden:
            self._check_name(relative.replace(os.sep, "/"))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            raise WireError(Code.NOT_FOUND, "no such file") from None
        except OSError as e:
            # ELOOP: a symlink swapped in after realpath; EACCES; ENXIO (a
            # socket); anything else unreadable.
            raise WireError(Code.FORBIDDEN, f"cannot open: {e.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise WireError(Code.FORBIDDEN, "not a regular file")
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        return OpenedFile(name, fd, info.st_size, identity)
