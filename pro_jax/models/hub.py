"""The Hugging Face Hub: model ids in (`resolve_pretrained`), exported directories out (`push_to_hub`).

Everything that loads a Hugging Face directory (`load_hf_model`, `load_tokenizer`, the ``hf:`` model
sources and scorers of the PRO stages) goes through `resolve_pretrained`, so each of them accepts

* a local directory (used as it is, the Hub is never asked), or
* a Hub id ``ORG/NAME`` (or ``NAME``), optionally ``ORG/NAME@REVISION`` (a branch, tag or commit).

A Hub id is fetched with `huggingface_hub.snapshot_download` into the Hub cache (``cache_dir``, else
``HF_HUB_CACHE`` / ``HF_HOME``, as huggingface_hub defines them) and the snapshot directory is returned.
The token comes from the environment (``HF_TOKEN`` or ``huggingface-cli login``), as huggingface_hub
reads it. With ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the cache is used. Every
failure (no network and nothing cached, an unknown repository or revision, a gated repository) is a
`HubError` that names the id, the revision and the cache directory.

Only the files a loader needs are downloaded (``allow_patterns``: configs, safetensors, tokenizer
files), never ``.bin`` / ``.pt`` weights or other large files a repository may hold.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

PathLike = str | os.PathLike

# What `load_hf_model` and `load_tokenizer` read from a repository.
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "vocab.*", "merges.*")
TOKENIZER_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "vocab.*", "merges.*")

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(?:@[A-Za-z0-9._/-]+)?$")


class HubError(ValueError):
  """A Hub id that cannot be resolved to a local snapshot (offline, unknown repository / revision...)."""


def _truthy(value: str | None) -> bool:
  return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
  """Whether the Hub must not be contacted: ``HF_HUB_OFFLINE`` (read now, not only at import)."""
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache_dir(cache_dir: PathLike | None = None) -> pathlib.Path:
  """The Hub cache used: `cache_dir`, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return pathlib.Path(os.environ["HF_HOME"]) / "hub"
  from huggingface_hub import constants
  return pathlib.Path(constants.HF_HUB_CACHE)


def split_hub_id(name: str) -> tuple[str, str | None]:
  """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")``; no ``@`` -> revision None."""
  repo, sep, rev = str(name).partition("@")
  return repo, (rev if sep else None)


def is_hub_id(name: PathLike) -> bool:
  """True for a string shaped like a Hub id (``ORG/NAME[@REV]``) that is not an existing local path."""
  if not isinstance(name, str) or os.path.exists(name):
    return False
  if name.startswith((".", "/", "~")) or "\\" in name or "//" in name:
    return False
  return bool(_REPO_ID.match(name))


def resolve_pretrained(name: PathLike, *, revision: str | None = None, cache_dir: PathLike | None = None,
                       token: str | bool | None = None, local_files_only: bool | None = None,
                       allow_patterns: Sequence[str] | None = MODEL_PATTERNS) -> pathlib.Path:
  """A local directory for `name`: the path itself when it exists, else the Hub snapshot of a Hub id.

  Args:
    name: a local path, or ``ORG/NAME`` / ``ORG/NAME@REVISION`` (a leading ``hf:`` is accepted).
    revision: branch, tag or commit (overrides an ``@REVISION`` in `name`); default the main branch.
    cache_dir: the Hub cache (default ``HF_HUB_CACHE`` / ``HF_HOME/hub``).
    token: default None = from the environment (``HF_TOKEN``, the saved login).
    local_files_only: only the cache; default True when ``HF_HUB_OFFLINE`` is set.
    allow_patterns: the files to fetch (default what `load_hf_model` reads).

  A `name` that exists locally, or is not shaped like a Hub id (``./x``, ``/abs``, ``a/b/c``), is
  returned as a path unchanged.

  Raises:
    HubError: the id cannot be resolved (offline and not cached, unknown repository or revision,
      gated, a network failure).
  """
  text = os.fspath(name)
  if text.startswith("hf:"):
    text = text[3:]
  if os.path.exists(text) or not is_hub_id(text):
    return pathlib.Path(text)  # a local path (a missing one is reported by the loader, naming it)
  repo_id, rev_in_name = split_hub_id(text)
  revision = revision or rev_in_name
  offline = hub_offline() if local_files_only is None else bool(local_files_only)
  cache = hub_cache_dir(cache_dir)
  where = f"{repo_id}" + (f"@{revision}" if revision else "") + f" (no local path {text!r} either)"

  from huggingface_hub import errors, snapshot_download
  try:
    path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), token=token,
                             local_files_only=offline,
                             allow_patterns=list(allow_patterns) if allow_patterns is not None else None)
  except errors.LocalEntryNotFoundError as e:
    if offline:
      raise HubError(f"hf:{where}: not in the local Hub cache {cache} and the Hub may not be contacted "
                     "(HF_HUB_OFFLINE is set): download it once with network access, point HF_HUB_CACHE at "
                     "a cache that holds it, or pass a local directory") from e
    raise HubError(f"hf:{where}: the Hub cannot be reached and the model is not in the local cache {cache} "
                   f"({type(e).__name__}: {e})") from e
  except errors.GatedRepoError as e:
    raise HubError(f"hf:{where}: a gated repository; accept its terms on huggingface.co and set HF_TOKEN") from e
  except errors.RepositoryNotFoundError as e:
    raise HubError(f"hf:{where}: no such repository on the Hub (or it is private: set HF_TOKEN)") from e
  except errors.RevisionNotFoundError as e:
    raise HubError(f"hf:{where}: the repository has no revision {revision!r}") from e
  except (errors.HfHubHTTPError, OSError) as e:
    raise HubError(f"hf:{where}: download failed ({type(e).__name__}: {e}); cache {cache}") from e
  return pathlib.Path(path)


def check_repo_id(repo_id: str) -> str:
  """`repo_id` when it is a Hub repository id ORG/NAME (no revision), else a `HubError`."""
  if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "/" not in repo_id or "@" in repo_id:
    raise HubError(f"--push-to-hub {repo_id!r}: expected a repository id ORG/NAME")
  return repo_id


def push_to_hub(folder: PathLike, repo_id: str, *, api: Any = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, token: str | None = None) -> Any:
  """Upload an exported directory (`pro-jax export`'s output) to the Hub repository `repo_id`.

  `api` is anything with huggingface_hub's ``HfApi.create_repo(repo_id, exist_ok=..., private=...)`` and
  ``HfApi.upload_folder(repo_id=..., folder_path=..., commit_message=..., revision=...)``; default
  ``huggingface_hub.HfApi(token=token)`` (token default: the environment). Returns upload_folder's
  result (a ``CommitInfo`` for the real Hub).
  """
  folder = pathlib.Path(folder)
  check_repo_id(repo_id)
  if not folder.is_dir() or not any(folder.iterdir()):
    raise HubError(f"{folder}: nothing to upload (not a directory, or empty)")
  if api is None:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
  from huggingface_hub import errors
  try:
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             commit_message=commit_message or f"Upload {folder.name} with pro-jax export",
                             revision=revision)
  except (errors.HfHubHTTPError, errors.LocalTokenNotFoundError, OSError) as e:
    raise HubError(f"push to hf:{repo_id} failed ({type(e).__name__}: {e}); a write token must be in HF_TOKEN "
                   "or saved by `hf auth login`") from e
