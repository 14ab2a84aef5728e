"""A local Google Cloud Storage JSON-API server for tests: `gcp-storage-emulator` (PyPI) in a child process.

Why this server: it is a real HTTP server speaking the GCS JSON API (media, multipart and resumable
uploads, listing with prefix / delimiter, ranged downloads, copy / rewrite / compose, deletes) and is
a pure-Python wheel, so `pip install -e '.[test]'` brings it; fake-gcs-server (the more complete Go
server) needs a Go toolchain or a container. What it lacks (and what our code does not rely on):
preconditions (`ifGenerationMatch`, so no protection against two concurrent writers of one object),
pagination of listings, HTTP/2. Two gaps matter to the clients and are filled in `_patch_server()`:
the `objects.move` call (`.../o/SRC/moveTo/o/DST`, which gcsfs uses for every rename; added as the
server-side copy + delete it stands for; without it gcsfs retries the 501 for ~30 s, then copies and
deletes itself), and the `x-goog-generation` / `x-goog-metageneration` headers of media downloads,
which GCS always sends and tensorstore requires (it fails with "Malformed StorageGeneration" when
it reads an object that already exists, e.g. a checkpoint step rewritten after a crash).

`GcsEmulator.start()` runs `python tests/gcs_emulator.py` in a child process which binds
127.0.0.1 on a free port (chosen by the OS, printed on stdout), keeps objects in memory (nothing on
disk) and exits by itself when its parent dies (it polls its parent's pid), so a killed pytest leaves
no server behind. `env()` is what every GCS client of the stack needs to talk to it:

  STORAGE_EMULATOR_HOST           gcsfs (etils.epath's gs:// backend without TensorFlow), google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL        tensorstore's `gcs` kvstore (Orbax array data)
  TENSORSTORE_GCS_HTTP_VERSION=1  the emulator speaks HTTP/1.1 only
  GOOGLE_AUTH_TOKEN_FOR_TESTING   tensorstore: a fixed bearer token instead of looking up credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs: skip the bucket-layout gRPC lookup (needs real credentials)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path


class GcsEmulator:
  """A gcp-storage-emulator child process on 127.0.0.1; `url`, `env()`, `create_bucket()`, `stop()`."""

  def __init__(self, log_path: str | os.PathLike | None = None):
    self.log_path = Path(log_path) if log_path else None
    self.proc: subprocess.Popen | None = None
    self.url = ""

  def start(self, timeout_s: float = 30.0) -> "GcsEmulator":
    log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
    self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(os.getpid())],
                                 stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    if log is not subprocess.DEVNULL:
      log.close()
    line = self._readline(timeout_s)
    if not line.startswith("PORT "):
      self.stop()
      raise RuntimeError(f"gcs emulator did not start (said {line!r}); log: {self.log_path}")
    self.url = f"http://127.0.0.1:{int(line.split()[1])}"
    return self

  def _readline(self, timeout_s: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline().decode()), daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0].strip() if out else ""

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "TENSORSTORE_GCS_HTTP_VERSION": "1", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}

  def create_bucket(self, name: str) -> str:
    """Create bucket `name` (JSON API `buckets.insert`); returns "gs://name"."""
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
      if r.status != 200:
        raise RuntimeError(f"creating bucket {name}: HTTP {r.status}")
    return f"gs://{name}"

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects in `bucket` under `prefix` (straight from the server, no client library)."""
    q = urllib.parse.urlencode({"prefix": prefix}) if prefix else ""
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}", timeout=10) as r:
      return sorted(item["name"] for item in json.load(r).get("items", []))

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc = None

  def __enter__(self) -> "GcsEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _patch_server() -> None:
  """Add `POST /storage/v1/b/B/o/SRC/moveTo/o/DST` (objects.move) to the emulator's routes and the
  generation headers to its media downloads."""
  from http import HTTPStatus

  from gcp_storage_emulator import server as srv
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
      dest = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"], p["bucket_name"],  # noqa: SLF001
                           p["dest_object_id"])
      storage.delete_file(p["bucket_name"], p["object_id"])
      response.json(dest)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND

  api = re.escape(srv.settings.API_ENDPOINT)
  route = (rf"^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
           {srv.POST: move})
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except NotFound:
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # objects.get(alt=media) calls it by this name
  handlers = [(regex, {m: download_with_generation if h is download else h for m, h in hs.items()})
              if isinstance(hs, dict) else (regex, hs) for regex, hs in srv.HANDLERS]
  srv.HANDLERS = (route, *handlers)


def _serve(parent_pid: int) -> None:
  """Child process: serve on a free port of 127.0.0.1 until the parent goes away or SIGTERM."""
  import logging
  import signal

  from gcp_storage_emulator.server import create_server

  _patch_server()
  if os.environ.get("GCS_EMULATOR_VERBOSE"):  # every request on stderr (the log file)
    logging.basicConfig(level=logging.INFO)
  else:
    logging.disable(logging.CRITICAL)  # request logs and client-disconnect tracebacks: noise
  server = create_server("127.0.0.1", 0, in_memory=True)
  server.start()
  port = server._api._httpd.server_address[1]  # noqa: SLF001 (the library has no accessor)
  sys.stdout.write(f"PORT {port}\n")
  sys.stdout.flush()
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  while not stop.wait(0.5):
    if os.getppid() != parent_pid:  # parent died: we were re-parented
      break
  server.stop()


if __name__ == "__main__":
  _serve(int(sys.argv[1]))
