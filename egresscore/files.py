"""Bounded reads of the control plane's input files (policies, cluster).

A policy or cluster file is read only when it is a regular file (a symlink to
one is fine) and only up to MAX_INPUT_BYTES: a FIFO, a socket, a device or
/dev/zero given as a policy file is an error naming it, never a read that
blocks or fills memory.  The file is opened with O_NONBLOCK and checked with
fstat before any byte is read, so a FIFO put in a policy folder cannot stall
the agent or the CLI.
"""

from __future__ import annotations

import os
import re
import stat

import yaml

from .errors import EgressError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = ["MAX_INPUT_BYTES", "MAX_YAML_DEPTH", "InputFileError", "read_input_file", "load_yaml",
           "yaml_line_of"]

MAX_INPUT_BYTES = 4 << 20  # per file: about 10,000 policies; a real one is a few hundred bytes
MAX_YAML_DEPTH = 64        # nested sequences/mappings; a policy needs 7

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class InputFileError(EgressError, ValueError):
    """An input file that cannot be read as text: its path and why."""

    def __init__(self, path, message):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


def _not_regular(mode):
    for test, kind in _KINDS:
        if test(mode):
            return f"not a regular file ({kind})"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _size(n):
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_input_file(path, limit=MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of the regular file `path` (at most `limit` bytes);
    InputFileError otherwise.  Never blocks on a FIFO or a device."""
    path = os.fspath(path)
    try:
        st = os.stat(path)  # before open: opening some devices has effects
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror or exc}") from None
    problem = _not_regular(st.st_mode)
    if problem:
        raise InputFileError(path, problem)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)  # the file opened, not the one stat() saw
        problem = _not_regular(st.st_mode)
        if problem:
            raise InputFileError(path, problem)
        if st.st_size > limit:
            raise InputFileError(path, f"is {_size(st.st_size)}, over the limit of {_size(limit)} per file")
        chunks, total = [], 0
        while total <= limit:  # the file may grow while we read it
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise InputFileError(path, f"is over the limit of {_size(limit)} per file")
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(path, f"is not UTF-8 text (line {line})") from None


def load_yaml(text, max_depth=MAX_YAML_DEPTH):
    """yaml.load (safe, libyaml when present) of one document, after an event
    scan that refuses nesting deeper than `max_depth`: libyaml's composer
    recurses on the C stack, and a document nested 30,000 deep crashes the
    process.  Errors are yaml.YAMLError, with the line of the problem."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > max_depth:
                raise yaml.MarkedYAMLError(problem=f"nested deeper than {max_depth} levels",
                                           problem_mark=event.start_mark)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return yaml.load(text, Loader=_Loader)


_STEP_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def yaml_line_of(text, field):
    """The line (from 1) of `field` ("nodes[1].name", "spec.destinationCIDRs[0]")
    in the YAML `text`, or of the deepest part of it found; None if none is.
    For error messages only: `text` must have passed load_yaml (depth)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        return None
    line = None
    for key, index in _STEP_RE.findall(field or ""):
        if index:
            if not isinstance(node, yaml.SequenceNode) or int(index) >= len(node.value):
                break
            node = node.value[int(index)]
        else:
            if not isinstance(node, yaml.MappingNode):
                break
            node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if node is None:
                break
        line = node.start_mark.line + 1
    return line
