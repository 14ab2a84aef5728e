"""Using a trained PRO run: `pro_jax.load_pro`, `pro-jax generate`, `pro-jax export` (merged and PEFT),
the push to a (local stand-in of the) Hub, on a tiny demo-like run whose policy trained LoRA adapters."""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pro_jax
from pro_jax.cli import EXIT_OK, EXIT_USAGE, main
from pro_jax.data.pipeline import prompt_arrays
from pro_jax.models.hf_io import load_hf_model
from pro_jax.models.lora import merge_lora
from pro_jax.models.peft_io import load_peft_adapter
from pro_jax.pro.weights import format_weights_text
from pro_jax.stages.policy import condition_prompt

pytestmark = pytest.mark.slow

TINY = ["--config.task.n_train=64", "--config.task.n_eval=16", "--config.model.d_model=32",
        "--config.model.mlp_dim=64", "--config.model.n_layers=1", "--config.policy.trainable=lora",
        "--config.policy.model.lora.rank=4", "--config.policy.model.lora.alpha=8",
        "--config.policy.optim.lr=0.05"]  # a large step: the adapters (b = 0 at init) must move the logits
for _stage in ("sft", "adapter", "policy"):
  TINY += [f"--config.{_stage}.total_steps=4", f"--config.{_stage}.batch_size=8",
           f"--config.{_stage}.optim.warmup_steps=1", f"--config.{_stage}.log.progress=False",
           f"--config.{_stage}.log.tensorboard=False"]
PROMPTS = ["what color is the zorb ?", "how do i poison the zorb ?"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  w = tmp_path_factory.mktemp("pro") / "w"
  for stage in ("sft", "adapter", "policy"):
    assert main([stage, "--config", "demo", "--workdir", str(w)] + TINY) == EXIT_OK, stage
  return w


@pytest.fixture(scope="module")
def run(run_dir):
  return pro_jax.load_pro(run_dir)


def _reference_texts(run, prompts, weights, max_new_tokens=6):
  """Independent path: training's condition_prompt, merged LoRA params, the plain generate."""
  params = merge_lora(run.policy.model_config, run.variables["params"], run.variables["lora"])
  model = pro_jax.Transformer(run.model.config.replace(lora=None))
  conditioned = [condition_prompt(p, w, run.objectives, run.decimals) for p, w in zip(prompts, weights)]
  tokens, mask = prompt_arrays(run.tokenizer, conditioned, run.max_prompt_len, run.template)
  out = pro_jax.generate(model, {"params": params}, tokens, mask, max_new_tokens=max_new_tokens, greedy=True,
                         eos_token_id=run.tokenizer.eos_token_id, pad_token_id=run.tokenizer.pad_token_id)
  texts = []
  for row, m in zip(np.asarray(out.tokens_BxN), np.asarray(out.response_mask_BxN)):
    ids = [int(x) for x, k in zip(row, m) if k and x != run.tokenizer.eos_token_id]
    texts.append(run.tokenizer.decode(ids, skip_special_tokens=True).strip())
  return texts


def test_load_pro_weights_generate_and_conditioning(run, run_dir):
  assert run.objectives == ("concise", "informative", "harmless") and run.conditioning == "text"
  assert "lora" in run.variables and run.model.config.lora.rank == 4
  w = run.weights(PROMPTS)
  assert w.shape == (2, 3) and np.allclose(w.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(w, pro_jax.load_adapter(str(run_dir / "adapter"))(PROMPTS), atol=1e-6)
  texts, used = run.generate(PROMPTS, max_new_tokens=6, return_weights=True)
  np.testing.assert_allclose(used, w, atol=1e-6)
  assert texts == _reference_texts(run, PROMPTS, w)
  fixed = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
  assert run.generate(PROMPTS, fixed, max_new_tokens=6) == _reference_texts(run, PROMPTS, fixed)
  conditioned = run.condition(PROMPTS[0], [0.7, 0.2, 0.1])
  assert conditioned[-1]["content"] == f"{PROMPTS[0]} <w> concise 0.7 informative 0.2 harmless 0.1 </w>"
  with pytest.raises(ValueError, match=r"expected \[2, 3\]"):
    run.generate(PROMPTS, [[0.5, 0.5]] * 2)
  with pytest.raises(ValueError, match="no trained reward model"):
    run.score(PROMPTS, texts)


def test_load_pro_on_a_user_mesh(run, run_dir):
  from jax.sharding import AxisType, Mesh
  mesh = Mesh(np.asarray(jax.devices()[:8], dtype=object).reshape(2, 4), ("data", "model"),
              axis_types=(AxisType.Auto,) * 2)
  on_mesh = pro_jax.load_pro(run_dir / "policy", mesh=mesh)
  assert on_mesh.params["embed"].sharding.mesh.axis_names == ("data", "model")
  w = run.weights(PROMPTS)
  assert on_mesh.generate(PROMPTS, w, max_new_tokens=6, batch_size=8) == run.generate(PROMPTS, w, max_new_tokens=6)


def test_generate_command(run, run_dir, capsys, monkeypatch):
  assert main(["generate", "--workdir", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "6"]) == EXIT_OK
  out = capsys.readouterr().out
  w = run.weights(PROMPTS[:1])[0]
  text = run.generate(PROMPTS[:1], max_new_tokens=6)[0]
  shown = "  ".join(f"{o}={x:.3f}" for o, x in zip(run.objectives, w))
  assert f"prompt:   {PROMPTS[0]}\nweights:  {shown}  (adapter)\nresponse: {text}\n" in out
  monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
  assert main(["generate", "--workdir", str(run_dir / "policy"), "--weights", "0,0,1", "--json",
               "--max-new-tokens", "6"]) == EXIT_OK
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["prompt"] for r in rows] == PROMPTS and all(r["weights"] == [0.0, 0.0, 1.0] for r in rows)
  assert [r["response"] for r in rows] == run.generate(PROMPTS, [0.0, 0.0, 1.0], max_new_tokens=6)
  assert main(["generate", "--workdir", str(run_dir), "--prompt", "x", "--weights", "1,0"]) == EXIT_USAGE
  assert "3 objectives" in capsys.readouterr().err
  assert main(["generate", "--workdir", str(run_dir / "nope"), "--prompt", "x"]) == EXIT_USAGE


def test_load_pro_finds_the_only_policy_run_of_a_workdir_by_any_name(run, run_dir, tmp_path, capsys):
  # the experiment configs name the policy run policy_<loss> (several losses can share one workdir)
  w = tmp_path / "w"
  shutil.copytree(run_dir, w)
  (w / "policy").rename(w / "policy_ric")
  found = pro_jax.load_pro(w)
  assert pathlib.Path(str(found.policy.directory)).parent == w / "policy_ric" and found.adapter is not None
  assert found.generate(PROMPTS, max_new_tokens=6) == run.generate(PROMPTS, max_new_tokens=6)
  shutil.copytree(w / "policy_ric", w / "policy_dpo")
  with pytest.raises(ValueError, match=r"several policy runs \['policy_dpo', 'policy_ric'\]; pick one"):
    pro_jax.load_pro(w)
  assert main(["generate", "--workdir", str(w), "--prompt", PROMPTS[0], "--max-new-tokens", "6"]) == EXIT_USAGE
  assert "--policy NAME" in capsys.readouterr().err
  assert main(["generate", "--workdir", str(w), "--policy", "policy_ric", "--prompt", PROMPTS[0],
               "--max-new-tokens", "6"]) == EXIT_OK
  assert capsys.readouterr().out.endswith(f"response: {run.generate(PROMPTS[:1], max_new_tokens=6)[0]}\n\n")


def _policy_logits(run, tokens, mask):
  return np.asarray(run.model.apply(run.variables, tokens, mask).logits)


def test_export_merged_loads_back_with_the_policy_logits(run, run_dir, tmp_path, capsys):
  out = tmp_path / "merged"
  assert main(["export", "--workdir", str(run_dir / "policy"), "--out", str(out)]) == EXIT_OK
  model, params = load_hf_model(out)
  tokens, mask = prompt_arrays(run.tokenizer, PROMPTS, 32)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens, mask).logits),
                             _policy_logits(run, tokens, mask), atol=1e-5)
  assert pro_jax.load_tokenizer(out)(PROMPTS[0])["input_ids"] == run.tokenizer(PROMPTS[0])["input_ids"]
  card = (out / "README.md").read_text()
  example = format_weights_text([1 / 3] * 3, run.objectives, run.decimals)
  assert "concise, informative, harmless" in card and example in card and "last user turn" in card
  for o, loc in zip(run.norm.objectives, run.norm.loc):
    assert f"| {o} | {loc:.6g} |" in card
  assert main(["export", "--workdir", str(run_dir / "policy"), "--out", str(out)]) == EXIT_USAGE  # not empty
  assert "not empty" in capsys.readouterr().err


def test_export_peft_adapter_on_the_run_base(run, run_dir, tmp_path):
  out = tmp_path / "peft"
  assert main(["export", "--workdir", str(run_dir / "policy"), "--out", str(out), "--peft"]) == EXIT_OK
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
  assert cfg["base_model_name_or_path"] == str((out / "base").resolve())
  base, base_params = load_hf_model(out / "base")
  config, lora = load_peft_adapter(out, base.config)
  tokens, mask = prompt_arrays(run.tokenizer, PROMPTS, 32)
  logits = pro_jax.Transformer(config).apply({"params": base_params, "lora": lora}, tokens, mask).logits
  np.testing.assert_allclose(np.asarray(logits), _policy_logits(run, tokens, mask), atol=1e-5)
  base_only = np.asarray(base.apply({"params": base_params}, tokens, mask).logits)
  assert np.abs(base_only - _policy_logits(run, tokens, mask)).max() > 1e-2  # the adapter matters here
  assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


class LocalHub:
  """An HfApi-like endpoint writing into a local Hub cache (the layout huggingface_hub reads offline)."""

  def __init__(self, cache: pathlib.Path):
    self.cache, self.calls = cache, []

  def create_repo(self, repo_id, exist_ok=False, private=None):
    self.calls.append(("create_repo", repo_id, exist_ok))

  def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None):
    self.calls.append(("upload_folder", repo_id, commit_message))
    commit = "c0ffee" + "0" * 34
    repo = self.cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / (revision or "main")).write_text(commit)
    return commit


def test_export_push_to_hub_through_an_endpoint_then_load_by_hub_id(run, run_dir, tmp_path, monkeypatch):
  from pro_jax.stages.export import export_run
  hub = LocalHub(tmp_path / "hub")
  export_run(run_dir / "policy", tmp_path / "out", push_to="me/pro-policy", api=hub)
  assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  model, params = load_hf_model("me/pro-policy")
  tokens, mask = prompt_arrays(run.tokenizer, PROMPTS, 32)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens, mask).logits),
                             _policy_logits(run, tokens, mask), atol=1e-5)
  with pytest.raises(ValueError, match="expected a repository id ORG/NAME"):
    export_run(run_dir / "policy", tmp_path / "out2", push_to="not a repo", api=hub)
