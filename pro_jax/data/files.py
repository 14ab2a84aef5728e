"""Files of a run, local or on GCS (`gs://...`), through `etils.epath` (gcsfs underneath for gs://).

Every path a PRO run writes (stage workdirs, `norm.json`, reports and plots, saved tokenizers, the
score cache) goes through these helpers, so a `gs://` workdir is used as is: never turned into
`<cwd>/gs:/...` by `os.path.abspath`, never written to local disk instead. Three things cannot be
done in place on GCS and get a local copy:

* libraries that read plain files (transformers' `from_pretrained`, SQLite) read a **local copy**
  (`local_copy`: a folder under the system temp dir named after the URL, downloaded once);
* libraries that write plain files (`save_pretrained`, matplotlib's `savefig`, `jax.profiler`)
  write into a local folder that is then **uploaded** (`upload`);
* a file updated many times (the SQLite score cache) lives in a **local mirror** pushed back after
  each update (`Mirror`).

Objects on GCS are written whole and atomically, so `write_text` writes a remote file directly and
a local one through a temporary file and `os.replace`; a local directory written whole (a model
export) is staged beside its place and renamed into it (`staged_directory`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URLs such as gs://bucket/x (anything with a scheme), False for local paths."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path`: local paths with `~` expanded and made absolute; URLs kept as they are."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string (a URL stays a URL)."""
  return os.fspath(as_path(path).joinpath(*parts))


def write_text(path: PathLike, text: str) -> None:
  """Write `text` whole: a reader sees the old or the new file, never half of one."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: PathLike, data: bytes) -> None:
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    p.write_bytes(data)  # one object upload: atomic on GCS
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=p.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.fspath(p))
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def staged_directory(path: PathLike, *, write: bool = True) -> Iterator[pathlib.Path]:
  """A fresh temp folder beside the local folder `path` to write a whole directory into (a model or
  adapter export): when the block ends cleanly it replaces `path` (an old `path` is removed only after
  the new one is in place), when it raises it is removed. A reader never sees a half-written `path`.

  `write=False` (the other hosts of a multi-host export, which only take part in the gathers) makes
  and replaces nothing; the folder it yields must not be written then.
  """
  path = pathlib.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  if not write:
    yield tmp
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp.mkdir()
  try:
    yield tmp
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _replace_dir(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Move the finished `tmp` to `path`; an old `path` is removed only after the new one is in place."""
  old = None
  if path.exists():
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
  try:
    os.replace(tmp, path)
  except BaseException:
    if old is not None:
      os.replace(old, path)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def cache_dir(path: PathLike, kind: str = "cache") -> pathlib.Path:
  """A local folder for `path` under `$TMPDIR/pro_jax_<kind>/` (named after the URL)."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", os.fspath(path)).strip("_")
  return pathlib.Path(tempfile.gettempdir()) / f"pro_jax_{kind}" / safe


def local_copy(path: PathLike) -> pathlib.Path:
  """A local path with the contents of `path` (a file or a folder tree): `path` itself when local,
  else a fresh download into `cache_dir(path)/<pid>` (small things: tokenizers, configs)."""
  if not is_remote(path):
    return pathlib.Path(os.path.expanduser(os.fspath(path)))
  src = as_path(path)
  if not src.exists():
    raise FileNotFoundError(f"{path}: no such file or folder")
  dst = cache_dir(path) / str(os.getpid()) / src.name
  if dst.exists():
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
  if src.is_dir():
    dst.mkdir(parents=True)
    for f, rel in _files_in(src):
      out = dst / rel
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_bytes(f.read_bytes())
  else:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
  return dst


def _files_in(folder: epath.Path, prefix: str = ""):
  """(file, relative path) of every file under `folder` (iterdir: rglob("**") is refused on GCS)."""
  for child in sorted(folder.iterdir()):
    if child.is_dir():
      yield from _files_in(child, prefix + child.name + "/")
    else:
      yield child, prefix + child.name


def upload(local: PathLike, dest: PathLike) -> None:
  """Copy a local file or folder tree to `dest` (local or remote); files only, existing ones replaced."""
  local = pathlib.Path(local)
  dst = as_path(dest)
  if local.is_dir():
    for f in sorted(local.rglob("*")):
      if f.is_file():
        write_bytes(dst / f.relative_to(local).as_posix(), f.read_bytes())
  else:
    write_bytes(dst, local.read_bytes())


def publish_dir(local: PathLike, dest: PathLike, *, last: str | None = None) -> None:
  """Copy the local folder tree `local` to `dest` so that no reader ever sees half of it.

  Local `dest`: the tree is copied into a `staged_directory` (a temporary sibling renamed into
  place); an existing `dest` (say, a damaged earlier copy) is first renamed aside to
  `<dest>.damaged` (`.damaged-2`, ... when taken), kept for inspection, never deleted. GCS has no
  folder rename: the files are uploaded one object at a time (each one whole), the file named `last`
  last, so a reader that finds `last` finds the rest too.
  """
  local = pathlib.Path(local)
  if is_remote(dest):
    names = sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    for rel in sorted(names, key=lambda r: r == last):  # `last` (False < True) at the end
      write_bytes(as_path(dest) / rel, (local / rel).read_bytes())
    return
  dst = pathlib.Path(os.fspath(as_path(dest)))
  if dst.exists():  # a damaged earlier copy: kept for inspection, never deleted
    aside, n = dst.with_name(dst.name + ".damaged"), 1
    while aside.exists():
      n += 1
      aside = dst.with_name(f"{dst.name}.damaged-{n}")
    os.replace(dst, aside)
  with staged_directory(dst) as tmp:
    shutil.copytree(local, tmp, dirs_exist_ok=True)


class Mirror:
  """A local copy of one file for libraries that update a file in place (SQLite).

  Local `path`: `local` is `path` itself and `push()` does nothing. Remote `path`: `local` is a file
  under `cache_dir(path, "mirror")/<pid>`, filled from `path` on creation when it exists there; `push()`
  uploads it (`enabled=False`, e.g. on processes other than 0: never uploads).
  """

  def __init__(self, path: PathLike, *, enabled: bool = True):
    self.path = os.fspath(path)
    self.remote = is_remote(path)
    self.enabled = enabled
    if not self.remote:
      self.local = pathlib.Path(os.path.abspath(os.path.expanduser(self.path)))
      return
    self.local = cache_dir(path, "mirror") / str(os.getpid()) / as_path(path).name  # one per process
    self.local.parent.mkdir(parents=True, exist_ok=True)
    src = as_path(path)
    if src.exists():
      self.local.write_bytes(src.read_bytes())
    else:
      self.local.unlink(missing_ok=True)  # a stale copy of a deleted workdir file

  def push(self) -> None:
    if self.remote and self.enabled and self.local.exists():
      write_bytes(self.path, self.local.read_bytes())


__all__ = ["is_remote", "as_path", "join", "write_text", "write_bytes", "local_copy", "upload", "Mirror",
           "cache_dir"]
