"""Publishing a directory built elsewhere: how a task store appears at its URI all at once, or not at all.

A build writes into a temporary sibling of the target (``<out>.tmp-<host>-<pid>-<hex>``: same filesystem or
bucket) and then publishes it:

- local paths: ``os.rename`` of the whole directory. Renaming onto a non-empty directory fails, so of two
  concurrent builds exactly one wins; replacing a store moves the old one aside (``<out>.old-…``) first and
  deletes it only once the new one is in place.
- object stores and other filesystems without an atomic directory rename (``s3://``, ``memory://``): the
  files are moved in, the marker file (the store's manifest) last, after any old marker was deleted first,
  so a reader sees either no store or a complete one.

Temporaries name their owner, so a later build removes those of dead processes (same host) or older than
``STALE_AFTER_S`` (another host), and never those of a build still running.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import shutil
import socket
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a temporary of another host is left alone for this long (its build may still run)
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST)  # rename onto a directory that is not empty
_NO_RENAME = (errno.EXDEV, errno.EBUSY)  # the target is a mount point or on another device


class PublishError(OSError):
    """The target cannot be published to (its parent is not a place for siblings)."""


def _temp_re(name: str) -> re.Pattern:
    return re.compile(rf"{re.escape(name)}\.(tmp|old)-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{12}}")


def sibling(root: str, kind: str) -> str:
    """A fresh temporary path next to ``root``, naming this host and process as its owner."""
    parent, name = posixpath.split(root)
    if not parent or not name or parent == root:
        raise PublishError(f"{root}: a store needs a parent folder (or a prefix inside the bucket)")
    return posixpath.join(parent, f"{name}.{kind}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def discard(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` (best effort: a leftover temporary is cleaned by a later build)."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        log.warning("could not remove %s (%s); a later build removes it", path, e)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _age_s(fs: fsspec.AbstractFileSystem, path: str) -> float | None:
    """Seconds since ``path`` (or the newest file in it) changed; None when the filesystem cannot say."""
    try:
        paths = [path] if is_local(fs) else fs.find(path)[:64]
        newest = max(fs.modified(p).timestamp() for p in paths)
    except (OSError, NotImplementedError, ValueError):
        return None
    return time.time() - newest


def _stale(fs: fsspec.AbstractFileSystem, path: str, host: str, pid: int) -> bool:
    if host == HOST:
        return not _alive(pid)
    age = _age_s(fs, path)
    return age is not None and age > STALE_AFTER_S


def set_aside(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """A previous store of ``root`` moved aside by a replace that never finished, if there is one."""
    parent, name = posixpath.split(root)
    pattern = _temp_re(name)
    try:
        entries = fs.ls(parent, detail=False)
    except (OSError, ValueError):
        return None
    found = [p for p in entries if (m := pattern.fullmatch(posixpath.basename(p.rstrip("/")))) and m.group(1) == "old"]
    return found[0] if found else None


def clean_stale(fs: fsspec.AbstractFileSystem, root: str, marker: str) -> None:
    """Remove the stale temporaries of ``root`` left by builds that died; a stale ``.old-`` copy (a replace
    interrupted between its two renames) is renamed back to ``root`` when ``root`` is absent."""
    parent, name = posixpath.split(root)
    pattern = _temp_re(name)
    try:
        entries = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(parent, detail=False))
    except OSError as e:  # no parent yet, or not listable: nothing to clean that we could see
        log.debug("not cleaning temporaries of %s: %s", root, e)
        return
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = posixpath.join(parent, entry)
        if m is None or not _stale(fs, path, m.group(2), int(m.group(3))):
            continue
        if m.group(1) == "old" and is_local(fs) and not fs.exists(root) and fs.exists(posixpath.join(path, marker)):
            _restore(path, root)
            continue
        log.warning("removing %s, left by a build that did not finish", path)
        discard(fs, path)


def _restore(aside: str, root: str) -> None:
    log.warning("restoring %s from %s (a replace was interrupted)", root, aside)
    try:
        os.rename(aside, root)
    except OSError as e:  # keep the copy: it may be the only one
        log.warning("could not restore %s from %s (%s); rename it back by hand", root, aside, e)


def publish(fs: fsspec.AbstractFileSystem, stage: str, root: str, *, replace: bool, marker: str) -> bool:
    """Make the directory ``stage`` appear at ``root``; ``replace``: what is at ``root`` goes. False when
    ``root`` changed under us (another build published first): the caller looks again and decides."""
    if is_local(fs):
        try:
            return _rename_into_place(stage, root, replace)
        except OSError as e:
            if e.errno not in _NO_RENAME:
                raise
            log.info("%s: no atomic rename here (%s); moving the files in, %s last", root, e, marker)
    _move_files(fs, stage, root, replace=replace, marker=marker)
    return True


def _rename_into_place(stage: str, root: str, replace: bool) -> bool:
    if not replace:
        try:
            os.rename(stage, root)  # fails on a non-empty directory: the first of two builds wins
        except OSError as e:
            if e.errno in _TAKEN:
                return False
            raise
        return True
    aside = sibling(root, "old")
    try:
        os.rename(root, aside)
    except FileNotFoundError:  # another build moved it first
        return False
    try:
        os.rename(stage, root)
    except OSError as e:
        if e.errno not in _TAKEN:
            with contextlib.suppress(OSError):
                os.rename(aside, root)  # put the old store back
            raise
        _rmtree(aside)
        return False
    _rmtree(aside)
    return True


def _rmtree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError as e:
        log.warning("could not remove %s (%s); a later build removes it", path, e)


def _move_files(fs: fsspec.AbstractFileSystem, stage: str, root: str, *, replace: bool, marker: str) -> None:
    """Publish without a directory rename: old marker out first, then the old files, the new files, and the
    new marker last, so the store is absent (never half old, half new) until the marker lands."""
    if replace and fs.exists(root):
        marker_path = posixpath.join(root, marker)
        if fs.exists(marker_path):
            fs.rm(marker_path)
        for path in fs.ls(root, detail=False):
            fs.rm(path, recursive=True)
    files = sorted(fs.find(stage))
    last = posixpath.join(stage, marker)
    for path in [p for p in files if p != last] + [last]:
        target = posixpath.join(root, path[len(stage) + 1:])
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.mv(path, target)
    discard(fs, stage)
