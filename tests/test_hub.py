"""Hub ids in (`pro_jax.models.hub.resolve_pretrained` under load_hf_model / load_tokenizer), against a
local file-based stand-in of the Hub cache (HF_HUB_CACHE laid out as huggingface_hub lays it out, with
HF_HUB_OFFLINE=1): no network is used."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from pro_jax.models.hf_io import load_hf_model
from pro_jax.models.hub import HubError, is_hub_id, resolve_pretrained, split_hub_id
from pro_jax.models.tokenizer import load_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "golden" / "fixtures"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "fedcba9876543210fedcba9876543210fedcba98"


def add_to_hub_cache(cache: pathlib.Path, repo_id: str, files_from: pathlib.Path, commit: str,
                     refs: tuple[str, ...] = ("main",)) -> pathlib.Path:
  """Lay out `files_from` as huggingface_hub's cache does: blobs/, snapshots/<commit>/ (links), refs/<ref>."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  (repo / "blobs").mkdir(exist_ok=True)
  for f in sorted(files_from.iterdir()):
    blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
    shutil.copyfile(f, blob)
    (snap / f.name).symlink_to(pathlib.Path("..", "..", "blobs", blob.name))
  (repo / "refs").mkdir(exist_ok=True)
  for ref in refs:
    (repo / "refs" / ref).write_text(commit)
  return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """A Hub cache holding org/tiny-llama (main = a Llama fixture + the synthetic task's tokenizer) and
  tag v1 = another commit (a GPT-2 fixture); HF_HUB_OFFLINE=1 so nothing may touch the network."""
  from pro_jax.data.synthetic import build_tokenizer
  cache = tmp_path / "hub"
  src = tmp_path / "src"
  shutil.copytree(FIXTURES / "llama_gqa_untied", src)
  (src / "golden.npz").unlink()
  build_tokenizer(None, src)
  add_to_hub_cache(cache, "org/tiny-llama", src, COMMIT)
  src2 = tmp_path / "src2"
  shutil.copytree(FIXTURES / "gpt2_lm", src2)
  add_to_hub_cache(cache, "org/tiny-llama", src2, TAGGED, refs=("v1",))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HOME", raising=False)
  return cache


def test_hub_id_shapes(tmp_path):
  assert is_hub_id("org/name") and is_hub_id("gpt2") and is_hub_id("org/name@v1.0")
  assert not is_hub_id("./org/name") and not is_hub_id("/abs/dir") and not is_hub_id("a/b/c")
  assert split_hub_id("org/name@abc") == ("org/name", "abc") and split_hub_id("org/name") == ("org/name", None)
  (tmp_path / "org").mkdir()
  local = tmp_path / "org"
  assert resolve_pretrained(str(local)) == local  # an existing path is never looked up on the Hub


def test_load_hf_model_from_hub_id_matches_local_load(hub_cache):
  model_hub, params_hub = load_hf_model("org/tiny-llama")
  model_loc, params_loc = load_hf_model(FIXTURES / "llama_gqa_untied")
  assert model_hub.config == model_loc.config
  golden = np.load(FIXTURES / "llama_gqa_untied" / "golden.npz")
  logits = model_hub.apply({"params": params_hub}, golden["tokens"], golden["mask"]).logits
  valid = golden["mask"].astype(bool)
  assert np.abs(np.asarray(logits)[valid] - golden["logits"][valid]).max() < 1e-4  # transformers' logits


def test_revision_tag_commit_and_hf_prefix(hub_cache):
  m_tag, _ = load_hf_model("org/tiny-llama@v1")
  assert m_tag.config.arch == "gpt2"
  m_rev, _ = load_hf_model("org/tiny-llama", revision="v1")
  assert m_rev.config.arch == "gpt2"
  assert resolve_pretrained("hf:org/tiny-llama", revision=COMMIT) == hub_cache / (
      "models--org--tiny-llama/snapshots/" + COMMIT)
  m_main, _ = load_hf_model("org/tiny-llama")
  assert m_main.config.arch == "llama"


def test_load_tokenizer_from_hub_id(hub_cache, tmp_path):
  from pro_jax.data.synthetic import build_tokenizer
  tok = load_tokenizer("org/tiny-llama")
  ref = load_tokenizer(build_tokenizer(None, tmp_path / "ref_tok"))
  text = "what color is the zorb ?"
  assert tok(text)["input_ids"] == ref(text)["input_ids"] and len(tok) == len(ref)


def test_offline_and_not_cached_is_a_clear_error(hub_cache):
  with pytest.raises(HubError, match=r"hf:org/missing.*not in the local Hub cache .*HF_HUB_OFFLINE"):
    load_hf_model("org/missing")
  with pytest.raises(HubError, match=r"org/tiny-llama@nope"):
    load_tokenizer("org/tiny-llama@nope")


def test_cache_dir_argument_overrides_the_environment(hub_cache, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
  with pytest.raises(HubError):
    load_hf_model("org/tiny-llama")
  model, _ = load_hf_model("org/tiny-llama", cache_dir=hub_cache)
  assert model.config.arch == "llama"


def test_hf_model_source_and_scorer_name_take_hub_ids(hub_cache):
  from pro_jax.models.sources import load_source
  backbone = load_source("hf:org/tiny-llama@v1")
  assert backbone.config.arch == "gpt2" and backbone.source == "hf:org/tiny-llama@v1"
  from pro_jax.stages.scoring import _source_name
  assert _source_name("org/tiny-llama") == "org/tiny-llama"  # a Hub id is not made an absolute path
