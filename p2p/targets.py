"""Where ``p2p get -o`` writes each name: worked out before any fetch.

One NAME with ``-o PATH``: PATH, or, when PATH is a folder, the NAME's last
component inside it (``p2p get -o DIR a/x`` writes ``DIR/x``).  Several
NAMEs (or names typed at the prompt) with ``-o DIR``: each keeps its
relative path under DIR, as ``wget -x`` does (``p2p get -o DIR a/x b/x``
writes ``DIR/a/x`` and ``DIR/b/x``); missing folders under DIR are made
when the name is fetched.  A ROOT is written under its own 64 digits.

A name that cannot be such a path (absolute, a ``.`` or ``..`` component,
an empty component, a component longer than the file system allows, not
representable in its encoding), two names that would be written to one
path (or one to a folder another needs), and a path under DIR that goes
through a symbolic link or a file are all refused before any peer is
asked: never a silent overwrite, never a write outside DIR.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from p2p.text import quoted

# Most bytes in one path component (NAME_MAX on Linux and the BSDs).
MAX_COMPONENT_BYTES = 255


class TargetError(ValueError):
    """A name cannot be written where ``-o`` says; the message says why."""


@dataclass(frozen=True)
class Target:
    """Where one name goes: C{path}, and the folder under which missing
    parent folders may be made (C{None}: none may be)."""

    path: str
    folder: str | None = None


def component_problem(part: str) -> str | None:
    """Why C{part} cannot be one component of a relative path, if it cannot."""
    if part == "":
        return "an empty path component"
    if part in (".", ".."):
        return f"a {quoted(part)} component"
    try:
        encoded = os.fsencode(part)
    except UnicodeEncodeError:
        return "not representable in the file system's encoding"
    if len(encoded) > MAX_COMPONENT_BYTES:
        return f"a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def relative_parts(name: str) -> list[str]:
    """
    C{name}'s components as a relative path.

    :raise TargetError: for a name that is not one.
    """
    if name.startswith("/"):
        raise TargetError(f"{quoted(name)} is an absolute path")
    parts = name.split("/")
    for part in parts:
        problem = component_problem(part)
        if problem is not None:
            raise TargetError(f"{quoted(name)} cannot be written as a path: {problem}")
    return parts


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class Targets:
    """
    Gives each name its L{Target} for one run of ``p2p get``.

    :param output: the ``-o`` argument, or C{None} (stdout).
    :param keep_paths: several names (or the prompt): ``output`` must be a
        folder, and names keep their relative paths under it.
    :raise TargetError: when C{keep_paths} and C{output} is not a folder.
    """

    def __init__(self, output: str | None, keep_paths: bool) -> None:
        self.output = output
        self.keep_paths = keep_paths and output is not None
        # path (as components under the folder) -> the name that claimed it
        self._claimed: dict[tuple[str, ...], str] = {}
        # every folder some claimed path needs -> a name that needs it
        self._folders: dict[tuple[str, ...], str] = {}
        if self.keep_paths and not os.path.isdir(output):  # type: ignore[arg-type]
            raise TargetError(
                f"-o {output}: must be a folder when fetching several names"
            )

    def claim(self, name: str, again: bool = False) -> Target | None:
        """
        The target of C{name} (C{None}: stdout), reserved for it: another
        name that would be written to the same path, or to a folder this
        one needs (or the reverse), is refused, and so is the same name
        again unless C{again} (a name typed at the prompt twice is fetched
        again, to the same target).

        :raise TargetError: with a one-line reason.
        """
        output = self.output
        if output is None:
            return None
        if not self.keep_paths:
            if os.path.isdir(output):
                base = name.rsplit("/", 1)[-1]
                problem = component_problem(base)
                if problem is not None:
                    raise TargetError(
                        f"{quoted(name)} cannot be written into {output}: {problem}"
                    )
                return Target(os.path.join(output, base))
            return Target(output)
        parts = tuple(relative_parts(name))
        earlier = self._claimed.get(parts)
        if earlier == name and not again:
            raise TargetError(f"{quoted(name)} is given twice")
        if earlier is not None and earlier != name:
            raise TargetError(
                f"{quoted(earlier)} and {quoted(name)} would both be written to "
                f"{os.path.join(output, *parts)}"
            )
        needing = self._folders.get(parts)
        if needing is not None:
            raise TargetError(
                f"{quoted(name)} would be written where {quoted(needing)} "
                "needs a folder"
            )
        for end in range(1, len(parts)):
            folder = parts[:end]
            holder = self._claimed.get(folder)
            if holder is not None:
                raise TargetError(
                    f"{quoted(name)} needs a folder where {quoted(holder)} "
                    "would be written"
                )
            path = os.path.join(output, *folder)
            if os.path.lexists(path) and not _is_dir(path):
                raise TargetError(
                    f"{quoted(name)} cannot be written: {path} is not a folder "
                    "(a file or a symbolic link)"
                )
        self._claimed[parts] = name
        for end in range(1, len(parts)):
            self._folders.setdefault(parts[:end], name)
        return Target(os.path.join(output, *parts), output)


def make_parents(target: Target) -> list[str]:
    """
    Make the folders C{target.path} needs under C{target.folder} (never
    through a symbolic link); return those made, deepest last, for
    L{remove_made} to undo.

    :raise OSError: when one cannot be made.
    """
    made: list[str] = []
    if target.folder is None:
        return made
    parent = os.path.dirname(target.path)
    if parent == target.folder:
        return made  # most names: no folder to make, nothing to resolve
    relative = os.path.relpath(parent, target.folder)
    if relative == os.curdir:
        return made
    path = target.folder
    for part in relative.split(os.sep):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            if not _is_dir(path):
                raise NotADirectoryError(
                    f"{path} is not a folder (a file or a symbolic link)"
                ) from None
            continue
        made.append(path)
    return made


def remove_made(made: list[str]) -> None:
    """Remove the folders L{make_parents} made, if they are still empty."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            return
