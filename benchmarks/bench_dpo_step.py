"""DPO train step, side by side: pro_jax vs Tunix vs TRL on the same Llama model and batch, this CPU.

One command measures, in ONE run, the full-fine-tuning DPO step (policy forward + backward through
chosen and rejected, frozen fp32 reference forward, AdamW update, fp32) of

* pro_jax: built exactly as the PRO policy stage builds it (`load_source("hf:...")`,
  `policy.dpo_task` (`policy_loss("dpo", ref_key="ref")`), `trainer.setup`, the state and the
  frozen reference initialized as `trainer.train` does), then `setup.step(state, frozen, batch)`;
* Tunix (`google-tunix`, its own venv): `DPOTrainer` on Tunix's `Llama3` loaded from the same
  safetensors; one step = `trainer._prepare_inputs(batch)` (its jitted reference forward) +
  the trainer's jitted train step (`jit_train_and_eval_step`), i.e. what its `train()` loop runs
  per step, minus metrics buffering;
* TRL (`trl` + `torch==2.13.0` CPU wheel, its own venv): `DPOTrainer.train()` on
  `LlamaForCausalLM.from_pretrained` of the same files, one optimizer step per iteration, step time
  taken between consecutive `on_step_end` callbacks.

Every framework sees the same weights (random Llama written with `pro_jax.save_hf_model`), the same
token ids and masks (prompts of `--prompt-len` real tokens, responses of random lengths right-padded
so that every sequence tensor is [2B, L]) and the same optimizer (AdamW, constant lr, b2 0.999,
no weight decay, global-norm clip 1.0). Each runs in its own subprocess with the same thread
settings; the first `--warmup` steps (compilation) are excluded and the median of the next `--steps`
is reported. Model FLOPs per step use one formula for all three (`pro_jax.train.logging.
model_flops_per_step`: 6 N T for the policy's forward + backward, 2 N T for the reference forward, N =
parameters in matmuls including the LM head, T = 2 B L tokens, plus causal attention), and MFU is
against this machine's measured fp32 matmul rate (`measure_cpu_matmul_peak`, before and after).
As a check that the three run the same computation, each reports its loss at the first step
(log 2: policy = reference) and after one update (it should agree to ~1e-3).

    python benchmarks/bench_dpo_step.py --setup-venvs          # create /tmp/tunixvenv, /tmp/trlvenv once
    python benchmarks/bench_dpo_step.py                        # all three, writes benchmarks/results/
    python benchmarks/bench_dpo_step.py --frameworks pro_jax --steps 10
    python benchmarks/bench_dpo_step.py --d-model 512 --n-layers 8 --seq-len 256 --batch 8 --steps 10

Defaults (d_model 512, 4 layers, 8 heads, mlp 1376, vocab 32000, 4 pairs of 128 tokens) are a small
Llama whose step takes a few seconds on 2 cores, so each framework runs its ~25 steps in about two
minutes: the 8-layer / 256-token / 8-pair size of a typical comparison costs ~1.4 TFLOP a step (~30 s
here). The vocab projection is ~55% of the model FLOPs at these sizes, as it is for small real
Llamas; bigger configs shift weight to the layers (use the flags).

Nothing of Tunix's or TRL's code is part of this repository: `--setup-venvs` pip-installs them
into separate venvs (TRL's with the CPU torch wheel pinned, `torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import append_report, cpu_model, spawn_worker

FRAMEWORKS = ("pro_jax", "tunix", "trl")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TUNIX_VENV = "/work/tunix-venv"
TRL_VENV = "/work/trl-venv"
SMOLLM2_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The matrix (--matrix): name, flags. Frameworks that cannot run a row are named in its notes.
MATRIX = [
    ("default (d 512, 4 layers, vocab 32000, 4 pairs x 128)", []),
    ("layer-dominated (d 512, 8 layers, mlp 1408, vocab 2048, 4 pairs x 256, prompt 64)",
     ["--n-layers", "8", "--mlp-dim", "1408", "--vocab", "2048", "--seq-len", "256", "--prompt-len", "64"]),
    ("SmolLM2-135M full fine-tuning (2 pairs x 128)", ["--model", "smollm2", "--batch", "2"]),
    ("SmolLM2-135M LoRA r 16, all linear layers (2 pairs x 128)", ["--model", "smollm2", "--batch", "2", "--lora-rank", "16"]),
    ("default shape, bf16 compute (TRL: bf16 autocast)", ["--dtype", "bfloat16"]),
]
TORCH_WHEEL_VERSION = "2.13.0"
TUNIX_PACKAGES = ["jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "google-tunix==0.1.7"]
TRL_PACKAGES = [f"torch=={TORCH_WHEEL_VERSION}", "trl", "transformers==5.24.0", "accelerate", "datasets"]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  m = p.add_argument_group("model (a Llama: RMSNorm, RoPE, SwiGLU, untied LM head)")
  m.add_argument("--d-model", type=int, default=512)
  m.add_argument("--n-layers", type=int, default=4)
  m.add_argument("--n-heads", type=int, default=8)
  m.add_argument("--n-kv-heads", type=int, default=None, help="default: n_heads (MHA)")
  m.add_argument("--mlp-dim", type=int, default=1376)
  m.add_argument("--vocab", type=int, default=32000)
  m.add_argument("--model", choices=("random", "smollm2"), default="random",
                 help="smollm2: the real SmolLM2-135M-Instruct (GGUF in $PRO_JAX_SHARED_DATA, dequantized, "
                      "exported with save_hf_model) instead of a random Llama of the flags' size")
  m.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on every linear layer (alpha = 2 r); "
                 "the reference is the base model (pro_jax ref_key='base', TRL's peft path)")
  m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (params stay fp32): pro_jax's model dtype, TRL's bf16 autocast")
  d = p.add_argument_group("batch")
  d.add_argument("--batch", type=int, default=4, help="preference pairs per step")
  d.add_argument("--seq-len", type=int, default=128, help="prompt + response slots per sequence")
  d.add_argument("--prompt-len", type=int, default=32)
  r = p.add_argument_group("run")
  r.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ",".join(FRAMEWORKS))
  r.add_argument("--steps", type=int, default=20, help="timed steps per framework (median reported)")
  r.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
  r.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (interleaved) this many times")
  r.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every framework")
  r.add_argument("--full-lm-head", action="store_true",
                 help="pro_jax: LM head at every position (default: on the response window only, as the "
                      "policy stage runs it with response_window = max_response_len)")
  r.add_argument("--lr", type=float, default=1e-6)
  r.add_argument("--beta", type=float, default=0.1)
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--peak-seconds", type=float, default=3.0, help="duration of the matmul-peak measurement")
  r.add_argument("--tunix-python", default=f"{TUNIX_VENV}/bin/python")
  r.add_argument("--trl-python", default=f"{TRL_VENV}/bin/python")
  r.add_argument("--matrix", action="store_true", help="run every row of MATRIX (other model flags ignored) "
                 "in one run and write one table")
  r.add_argument("--setup-venvs", action="store_true", help="create the Tunix / TRL venvs if missing, then exit")
  r.add_argument("--results-dir", default=str(HERE / "results"), help="'' = do not write a results file")
  r.add_argument("--timeout", type=float, default=1800.0, help="seconds per framework subprocess")
  p.add_argument("--worker", choices=FRAMEWORKS + ("peak", "rates_jax", "rates_torch"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Shared inputs: the batch and the weights


def make_batch(args) -> dict[str, np.ndarray]:
  """Prompts [B, Lp] (all real), chosen / rejected responses [B, Lc] right-padded (lengths in
  [Lc/2, Lc]; the first pair's chosen and the second's rejected have full length, so every
  framework's [2B, Lp + Lc] tensors are the same size)."""
  B, L, Lp, V = args.batch, args.seq_len, args.prompt_len, args.vocab
  Lc = L - Lp
  if not 0 < Lp < L:
    raise SystemExit(f"--prompt-len must be in (0, --seq-len), got {Lp} with --seq-len {L}")
  rng = np.random.default_rng(args.seed)
  out = {"prompt": rng.integers(3, V, size=(B, Lp)).astype(np.int32)}
  for i, side in enumerate(("chosen", "rejected")):
    lengths = rng.integers(max(Lc // 2, 1), Lc + 1, size=B)
    lengths[i % B] = Lc
    mask = (np.arange(Lc)[None] < lengths[:, None]).astype(np.int32)
    out[side] = rng.integers(3, V, size=(B, Lc)).astype(np.int32) * mask
    out[f"{side}_mask"] = mask
  return out


def write_weights(args, path: Path) -> dict:
  """Random Llama weights (or SmolLM2's, --model smollm2) as a transformers checkpoint; its ModelConfig."""
  import jax
  from pro_jax.models import ModelConfig, Transformer, init_variables
  from pro_jax.models.hf_io import save_hf_model

  if args.model == "smollm2":
    from pro_jax.models.gguf import load_gguf
    gguf = Path(os.environ.get("PRO_JAX_SHARED_DATA", "/work/shared/data")) / SMOLLM2_GGUF
    if not gguf.exists():
      raise SystemExit(f"--model smollm2: {gguf} not found (set PRO_JAX_SHARED_DATA)")
    model, params, _ = load_gguf(gguf, tokenizer=False)
    save_hf_model(path, model, params, overwrite=True)
    return model.config.to_dict()

  # rope_theta 1e6: Tunix 0.1.7's Llama3 applies RoPE with theta = 1e6 whatever its config says, so
  # the three frameworks compute the same function with this value.
  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    n_kv_heads=args.n_kv_heads, mlp_dim=args.mlp_dim, max_seq_len=max(args.seq_len, 128),
                    rope_theta=1e6, norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = Transformer(cfg)
  params = jax.jit(lambda k: init_variables(model, k))(jax.random.key(args.seed))["params"]
  save_hf_model(path, model, params, overwrite=True)
  return cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its framework's own interpreter; imports stay inside)


def _timings(step_fn, warmup: int, steps: int) -> tuple[list[float], list[float]]:
  """Run `step_fn()` (which blocks until its step is done and returns the loss) warmup + steps times."""
  times, losses = [], []
  for _ in range(warmup + steps):
    t0 = time.perf_counter()
    losses.append(float(step_fn()))
    times.append(time.perf_counter() - t0)
  return times, losses


def worker_peak(spec: dict) -> dict:
  from pro_jax.train.flops import measure_cpu_matmul_peak
  return {"peak_flops": measure_cpu_matmul_peak(seconds=spec["peak_seconds"], n=2048)}


def _rate(fn, n: int, seconds: float) -> float:
  fn()
  iters, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds or iters < 2:
    fn()
    iters += 1
  return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)


def worker_rates_jax(spec: dict) -> dict:
  """2048^3 matmul rates of this host: XLA fp32, XLA bf16 (fp32 accumulation), numpy fp32."""
  import jax
  import jax.numpy as jnp
  n, sec = 2048, spec["peak_seconds"]
  a32 = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  out = {"numpy fp32": _rate(lambda: a32 @ a32, n, sec)}
  for name, dt in (("XLA fp32", jnp.float32), ("XLA bf16 (fp32 acc.)", jnp.bfloat16)):
    x = jnp.asarray(a32, dt)
    f = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32))
    out[name] = _rate(lambda: f(x, x).block_until_ready(), n, sec)
  return out


def worker_rates_torch(spec: dict) -> dict:
  import torch
  torch.set_num_threads(spec["threads"])
  n, sec = 2048, spec["peak_seconds"]
  a = torch.randn(n, n)
  b16 = a.to(torch.bfloat16)
  return {"torch fp32": _rate(lambda: a @ a, n, sec), "torch bf16": _rate(lambda: b16 @ b16, n, sec)}


class _FixedPairs:
  """The stand-in for `pro_jax.data.Pipeline` that the stage task builder reads (batch spec, batch size, data):
  one fixed pair batch in the pair pipeline's layout (docs/ARCHITECTURE.md, "pair batch")."""

  def __init__(self, batch: dict[str, np.ndarray]):
    import jax
    self.batch = batch
    self.config = argparse.Namespace(batch_size=len(batch["example_id"]))
    self._spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

  def batch_spec(self):
    return self._spec

  def with_rows(self, rows):
    return self

  def iterator(self):
    import itertools
    return itertools.repeat(self.batch)


def pro_jax_pair_batch(data: dict[str, np.ndarray], n_objectives: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
  """The pair pipeline's batch: prompt + response right-padded to L, loss_mask on response tokens,
  plus the fields the policy stage adds (weights, normalized rewards)."""
  B, Lp = data["prompt"].shape
  out = {}
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([data["prompt"], data[side]], axis=1)
    mask = np.concatenate([np.ones_like(data["prompt"]), data[f"{side}_mask"]], axis=1)
    loss_mask = np.concatenate([np.zeros_like(data["prompt"]), data[f"{side}_mask"]], axis=1)
    out[f"{side}_tokens"], out[f"{side}_mask"], out[f"{side}_loss_mask"] = tokens * mask, mask, loss_mask
  out["prompt_tokens"], out["prompt_mask"] = data["prompt"], np.ones_like(data["prompt"])
  rng = np.random.default_rng(seed)
  out["pair_objectives"] = np.ones((B, n_objectives), np.float32)
  out["example_id"] = np.arange(B, dtype=np.int32)
  out["weights"] = rng.dirichlet(np.ones(n_objectives), size=B).astype(np.float32)
  out["reward_chosen"] = rng.normal(size=(B, n_objectives)).astype(np.float32)
  out["reward_rejected"] = rng.normal(size=(B, n_objectives)).astype(np.float32)
  return out


def build_pro_jax_step(spec: dict):
  """(setup, state, frozen, batch) of the PRO policy stage's DPO step, built as `run_policy` does."""
  import jax
  from pro_jax import sharding as shd
  from pro_jax.configs.pro_base import pro_config
  from pro_jax.models.sources import load_source
  from pro_jax.stages.policy import dpo_task
  from pro_jax.stages.stage import StageInputs
  from pro_jax.train.config import model_config_from
  from pro_jax.train.state import init_state, split_variables
  from pro_jax.train.trainer import setup

  data = dict(np.load(spec["batch_file"]))
  batch_np = pro_jax_pair_batch(data, seed=spec["seed"])
  B = batch_np["chosen_tokens"].shape[0]
  # The policy stage's engine config (pro_base.policy) with this benchmark's batch and optimizer.
  cfg = pro_config().policy
  cfg.batch_size = B
  cfg.total_steps = spec["warmup"] + spec["steps"]
  cfg.trainable = "lora" if spec.get("lora_rank") else "full"
  cfg.model.dtype = spec.get("dtype", "float32")
  if spec.get("lora_rank"):
    cfg.model.lora = dict(rank=spec["lora_rank"], alpha=2.0 * spec["lora_rank"], dropout=0.0, targets=ALL_LINEAR)
  cfg.optim.update(lr=spec["lr"], warmup_steps=0, decay="constant", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   clip_norm=1.0)
  # run_policy: init = load_source(...); the stage model = the backbone's architecture with the
  # stage's dtypes / remat / scan / LoRA (stage_model_config); the reference = the same without LoRA.
  init = load_source(f"hf:{spec['weights_dir']}")
  sm = cfg.model
  mcfg = init.config.replace(dtype=sm.dtype, param_dtype=sm.param_dtype, remat=sm.remat, scan_layers=sm.scan_layers,
                             lora=model_config_from(sm).lora, head="lm", value_head=False)
  # The reference shares the backbone's arrays, as in run_policy (the stage init copies them); the task
  # comes from the policy stage's own builder (`dpo_task`).
  pairs = _FixedPairs(batch_np)
  # With LoRA the reference is the policy's own base (the stage's ref_key="base"), as TRL's peft path.
  ref_key = "base" if spec.get("lora_rank") else "ref"
  frozen_in = {} if ref_key == "base" else {"ref": {"params": init.params}}
  task = dpo_task(cfg, mcfg, pairs.batch_spec(), "dpo", beta=spec["beta"], ref_key=ref_key,
                  response_window=spec.get("response_window"), name="policy",
                  inputs=StageInputs(init=init.params, frozen=frozen_in, data=pairs))
  mesh = shd.mesh_from_config(cfg.mesh)
  su = setup(cfg, task, mesh)
  # as trainer.train: variables with their shardings, split, the state, the frozen inputs, the batch
  var_sh = shd.param_shardings(task.logical_axes, task.abstract_variables, mesh, su.rules)
  variables = task.init_variables(jax.random.PRNGKey(cfg.seed), shardings=var_sh)
  trainable, base = split_variables(variables, cfg.trainable)
  state = jax.jit(lambda p, r: init_state(p, su.optimizer, r), out_shardings=su.state_shardings,
                  donate_argnums=(0,))(trainable, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1))
  frozen = {"base": base}
  if task.init_frozen is not None:
    frozen.update(task.init_frozen(shardings={k: v for k, v in su.frozen_shardings.items() if k != "base"}))
  batch = shd.host_local_to_global(batch_np, mesh, B)
  return su, state, frozen, batch


def worker_pro_jax(spec: dict) -> dict:
  import jax
  su, state, frozen, batch = build_pro_jax_step(spec)
  holder = {"state": state}

  def step():
    holder["state"], metrics = su.step(holder["state"], frozen, batch)
    return jax.block_until_ready(metrics)["loss"]

  times, losses = _timings(step, spec["warmup"], spec["steps"])
  return {"times": times, "losses": losses, "version": f"pro_jax (jax {jax.__version__})"}


def worker_tunix(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from importlib.metadata import version
  from tunix.models.llama3 import model as llama_lib
  from tunix.models.llama3 import params as llama_params
  from tunix.sft import sharding_utils
  from tunix.sft.dpo import dpo_trainer

  m = spec["model"]
  if spec.get("lora_rank") or spec.get("dtype", "float32") != "float32" or m.get("tie_embeddings"):
    raise SystemExit("tunix: this harness runs Tunix only on the random untied fp32 full-fine-tuning Llamas "
                     "(Tunix 0.1.7's Llama3 applies RoPE with theta 1e6 whatever the config says, so it would "
                     "compute a different function from SmolLM2's weights; its LoRA goes through qwix)")
  data = dict(np.load(spec["batch_file"]))
  hd = m["d_model"] // m["n_heads"]
  cfg = llama_lib.ModelConfig(num_layers=m["n_layers"], vocab_size=m["vocab_size"], embed_dim=m["d_model"],
                              hidden_dim=m["mlp_dim"], num_heads=m["n_heads"], head_dim=hd,
                              num_kv_heads=m["n_kv_heads"] or m["n_heads"], rope_theta=int(m["rope_theta"]),
                              norm_eps=m["norm_eps"])
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
    policy = llama_params.create_model_from_safe_tensors(spec["weights_dir"], cfg, mesh, dtype=jnp.float32)
    ref = llama_params.create_model_from_safe_tensors(spec["weights_dir"], cfg, mesh, dtype=jnp.float32)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(spec["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10 ** 9, max_steps=spec["warmup"] + spec["steps"],
                                           beta=spec["beta"], pbar_description=None)
    trainer = dpo_trainer.DPOTrainer(policy, ref, optimizer, config)
    train_step, _ = trainer.jit_train_and_eval_step(skip_jit=False, cache_nnx_graph=True)
    example = dpo_trainer.TrainingInput(
        prompt_ids=jnp.asarray(data["prompt"]), prompt_mask=jnp.ones_like(jnp.asarray(data["prompt"])),
        chosen_ids=jnp.asarray(data["chosen"]), chosen_mask=jnp.asarray(data["chosen_mask"]),
        rejected_ids=jnp.asarray(data["rejected"]), rejected_mask=jnp.asarray(data["rejected_mask"]))

    def step():
      ex = trainer._prepare_inputs(example)  # the jitted reference forward + masks / positions
      ex = sharding_utils.shard_input(ex, trainer.config.data_sharding_axis)
      loss, aux, grad_norm = train_step(ex)
      return jax.block_until_ready(loss)

    times, losses = _timings(step, spec["warmup"], spec["steps"])
  return {"times": times, "losses": losses,
          "version": f"google-tunix {version('google-tunix')} (jax {jax.__version__}, flax {version('flax')})"}


def worker_trl(spec: dict) -> dict:
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from tokenizers import Tokenizer, models
  from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
  from trl import DPOConfig, DPOTrainer

  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  data = dict(np.load(spec["batch_file"]))
  m = spec["model"]
  B = data["prompt"].shape[0]
  n_steps = spec["warmup"] + spec["steps"]
  # The batch, pre-tokenized: TRL's collator concatenates prompt + response and pads to the longest.
  rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
  for _ in range(n_steps):
    for b in range(B):
      rows["prompt_ids"].append(data["prompt"][b].tolist())
      for side in ("chosen", "rejected"):
        n = int(data[f"{side}_mask"][b].sum())
        rows[f"{side}_ids"].append(data[side][b, :n].tolist())
  dataset = Dataset.from_dict(rows)
  # TRL tokenizes text datasets itself; ours is already token ids, so its text preparation is skipped.
  DPOTrainer._prepare_dataset = lambda self, ds, *a, **k: ds
  text_dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
  tok = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>")),
      pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  policy = AutoModelForCausalLM.from_pretrained(spec["weights_dir"], dtype=torch.float32)
  ref = AutoModelForCausalLM.from_pretrained(spec["weights_dir"], dtype=torch.float32)
  stamps: list[float] = []
  losses: list[float] = []

  class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      if not stamps:
        stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
      stamps.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and "loss" in logs:
        losses.append(float(logs["loss"]))

  outdir = tempfile.mkdtemp(prefix="trl_bench_")
  args = DPOConfig(output_dir=outdir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                   max_steps=n_steps, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                   adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                   beta=spec["beta"], loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to="none",
                   use_cpu=True, bf16=spec.get("dtype") == "bfloat16", fp16=False, dataloader_num_workers=0, seed=spec["seed"],
                   train_sampling_strategy="sequential", max_length=None, disable_tqdm=True,
                   gradient_checkpointing=False)
  peft_config = None
  if spec.get("lora_rank"):
    from peft import LoraConfig
    peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0,
                             target_modules=list(ALL_LINEAR), bias="none", task_type="CAUSAL_LM")
    ref = None  # TRL's peft path: the reference is the policy with its adapters disabled
  trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=text_dataset, processing_class=tok,
                       peft_config=peft_config)
  trainer.train_dataset = dataset
  trainer.add_callback(Clock())
  trainer.train()
  times = [b - a for a, b in zip(stamps, stamps[1:])]
  return {"times": times, "losses": losses,
          "version": f"trl {trl.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"}


WORKERS = {"pro_jax": worker_pro_jax, "tunix": worker_tunix, "trl": worker_trl, "peak": worker_peak,
           "rates_jax": worker_rates_jax, "rates_torch": worker_rates_torch}


def run_worker(name: str, spec_path: str) -> None:
  spec = json.loads(Path(spec_path).read_text())
  result = WORKERS[name](spec)
  Path(spec["out"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver


def setup_venvs(args) -> None:
  """Create the Tunix and TRL venvs with pip (skipped when their interpreter already exists)."""
  wheel = Path(f"/opt/wheels/torch-{TORCH_WHEEL_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
  plans = [(Path(args.tunix_python), TUNIX_PACKAGES, []),
           (Path(args.trl_python), TRL_PACKAGES, [str(wheel)] if wheel.exists() else [])]
  for python, packages, first in plans:
    venv = python.parent.parent
    if python.exists():
      print(f"[bench] {venv} exists; skipping (delete it to rebuild)")
      continue
    print(f"[bench] creating {venv}: pip install {' '.join(first + packages)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    if first:
      subprocess.run(pip + first, check=True)
    subprocess.run(pip + packages, check=True)


def _spawn(python: str, worker: str, spec: dict, workdir: Path, threads: int, timeout: float) -> dict:
  return spawn_worker(__file__, python, worker, spec, workdir, threads, timeout)


def _load_avg() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    run_worker(args.worker, args.spec)
    return {}
  if args.setup_venvs:
    setup_venvs(args)
    return {}
  if args.matrix:
    return run_matrix(args, argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only writes the weights and counts FLOPs
  frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  bad = [f for f in frameworks if f not in FRAMEWORKS]
  if bad:
    raise SystemExit(f"--frameworks: unknown {bad}; choose from {FRAMEWORKS}")
  pythons = {"pro_jax": sys.executable, "tunix": args.tunix_python, "trl": args.trl_python}
  for f in frameworks:
    if not Path(pythons[f]).exists():
      raise SystemExit(f"{f}: interpreter {pythons[f]} not found; run `python {Path(__file__).name} --setup-venvs` "
                       f"(or pass --{f}-python)")

  from pro_jax.train import flops as train_flops
  from pro_jax.models import ModelConfig

  workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
  print(f"[bench] writing {args.model} Llama weights to {workdir / 'weights'}", flush=True)
  mdict = write_weights(args, workdir / "weights")
  mcfg = ModelConfig.from_dict(mdict)
  args.vocab = mcfg.vocab_size
  data = make_batch(args)
  np.savez(workdir / "batch.npz", **data)
  B, L = args.batch, args.seq_len
  tokens = 2 * B * L
  flops = train_flops.model_flops_per_step(mcfg, tokens, L, extra_forward_tokens=tokens)
  spec = {"batch_file": str(workdir / "batch.npz"), "weights_dir": str(workdir / "weights"), "model": mdict,
          "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "beta": args.beta, "seed": args.seed,
          "threads": args.threads, "peak_seconds": args.peak_seconds, "lora_rank": args.lora_rank,
          "dtype": args.dtype,
          "response_window": None if args.full_lm_head else L - args.prompt_len}
  load_before = _load_avg()
  print(f"[bench] load average {load_before}; measuring the fp32 matmul peak", flush=True)
  peaks = [_spawn(sys.executable, "peak", spec, workdir, args.threads, args.timeout).get("peak_flops", float("nan"))]
  results: dict[str, list[dict]] = {f: [] for f in frameworks}
  for rnd in range(args.rounds):
    for f in frameworks:
      print(f"[bench] round {rnd + 1}/{args.rounds}: {f} ({args.warmup} warm-up + {args.steps} steps) ...", flush=True)
      res = _spawn(pythons[f], f, spec, workdir, args.threads, args.timeout)
      if "error" in res:
        print(f"[bench] {res['error']}", flush=True)
      else:
        med = statistics.median(res["times"][args.warmup:])
        print(f"[bench]   {f}: median {med:.3f} s/step ({res['wall_s']:.0f} s wall)", flush=True)
      results[f].append(res)
  peaks.append(_spawn(sys.executable, "peak", spec, workdir, args.threads, args.timeout).get("peak_flops", float("nan")))
  load_after = _load_avg()
  peak = float(np.nanmean(peaks))

  rows = {}
  for f in frameworks:
    ok = [r for r in results[f] if "error" not in r]
    if not ok:
      rows[f] = {"error": results[f][-1]["error"] if results[f] else "not run"}
      continue
    medians = [statistics.median(r["times"][args.warmup:]) for r in ok]
    sec = statistics.median(medians)
    losses = ok[0]["losses"]
    rows[f] = {"s_per_step": sec, "round_medians": medians, "tokens_per_s": tokens / sec,
               "gflops_per_s": flops / sec / 1e9, "mfu": flops / sec / peak, "first_step_s": ok[0]["times"][0],
               "loss_step1": losses[0] if losses else float("nan"),
               "loss_step2": losses[1] if len(losses) > 1 else float("nan"), "version": ok[0]["version"]}
  ratios = {}
  if "pro_jax" in rows and "s_per_step" in rows["pro_jax"]:
    for f in ("tunix", "trl"):
      if f in rows and "s_per_step" in rows[f]:
        ratios[f] = rows[f]["s_per_step"] / rows["pro_jax"]["s_per_step"]

  nkv = mcfg.kv_heads
  header = (f"model: {'SmolLM2-135M ' if args.model == 'smollm2' else ''}Llama d_model={mcfg.d_model} "
            f"layers={mcfg.n_layers} heads={mcfg.n_heads}/{nkv} mlp={mcfg.mlp_dim} vocab={mcfg.vocab_size} "
            f"({mcfg.num_params() / 1e6:.1f}M params), params fp32, compute {args.dtype}"
            f"{f', LoRA r={args.lora_rank} on all linear layers' if args.lora_rank else ', full fine-tuning'}\n"
            f"batch: {B} pairs x {L} tokens (prompt {args.prompt_len}) = {tokens} policy tokens/step "
            f"(+ the same through the frozen reference)\n"
            f"model FLOPs/step: {flops / 1e9:.1f} GFLOP (6NT policy + 2NT reference + attention)\n"
            f"fp32 matmul peak (2048^3, measured before/after): "
            f"{' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s; threads {args.threads}; "
            f"load average before {load_before}, after {load_after}\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s), median")
  lines = ["| framework | s/step | tokens/s | GFLOP/s | MFU (of measured peak) | 1st step s | loss step 1 | "
           "loss step 2 | version |", "|---|---|---|---|---|---|---|---|---|"]
  for f in frameworks:
    r = rows[f]
    if "error" in r:
      lines.append(f"| {f} | failed | | | | | | | see below |")
      continue
    lines.append(f"| {f} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
                 f"{100 * r['mfu']:.1f}% | {r['first_step_s']:.1f} | {r['loss_step1']:.6f} | {r['loss_step2']:.6f} | "
                 f"{r['version']} |")
  ratio_line = ", ".join(f"pro_jax / {f} step rate = {v:.2f}x" for f, v in ratios.items())
  if args.rounds > 1:
    per_round = "; ".join(f"{f}: " + ", ".join(f"{m:.3f}" for m in rows[f]["round_medians"])
                          for f in frameworks if "round_medians" in rows[f])
    ratio_line += f"\nper-round medians (s/step): {per_round}"
  errors = [f"{f}: {rows[f]['error']}" for f in frameworks if "error" in rows[f]]
  report = header + "\n\n" + "\n".join(lines) + "\n\n" + ratio_line + ("\n\n" + "\n".join(errors) if errors else "")
  print("\n" + report)
  if args.results_dir:
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now()
    path = out_dir / f"dpo_step_{stamp:%Y-%m-%d}.md"
    cmd = "python benchmarks/bench_dpo_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(path, "a") as fh:
      fh.write(f"## {stamp:%Y-%m-%d %H:%M}\n\n`{cmd.strip()}`\n\n```\n{header}\n```\n\n" + "\n".join(lines) +
               "\n\n" + ratio_line.replace("\n", "  \n") + "\n\n" + ("\n".join(errors) + "\n\n" if errors else ""))
    print(f"[bench] appended to {path}")
  return {"rows": rows, "ratios": ratios, "peaks": peaks, "flops_per_step": flops, "header": header}


def run_matrix(args, argv) -> dict:
  """Every MATRIX row in one run (same steps / threads), then one table with the CPU and matmul rates."""
  workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_rates_"))
  spec = {"peak_seconds": args.peak_seconds, "threads": args.threads}
  rates = _spawn(sys.executable, "rates_jax", spec, workdir, args.threads, args.timeout)
  if Path(args.trl_python).exists():
    rates.update(_spawn(args.trl_python, "rates_torch", spec, workdir, args.threads, args.timeout))
  rates.pop("wall_s", None)
  print(f"[bench] matmul rates: {rates}", flush=True)
  common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
            "--threads", str(args.threads), "--results-dir", "", "--frameworks", args.frameworks,
            "--tunix-python", args.tunix_python, "--trl-python", args.trl_python, "--timeout", str(args.timeout)]
  out = {}
  for name, flags in MATRIX:
    print(f"\n[bench] ===== {name} =====", flush=True)
    out[name] = main(flags + common)
  fws = [f for f in args.frameworks.split(",") if f]
  lines = ["| shape | " + " | ".join(f"{f} s/step" for f in fws) + " | pro_jax vs fastest other |",
           "|---|" + "---|" * (len(fws) + 1)]
  for name, res in out.items():
    cells = []
    for f in fws:
      r = res["rows"].get(f, {})
      cells.append(f"{r['s_per_step']:.3f}" if "s_per_step" in r else "n/a")
    others = [v for k, v in res["ratios"].items()]
    best = f"{min(others):.2f}x" if others else "n/a"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {best} |")
  rate_line = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items() if isinstance(v, float))
  header = (f"CPU: {cpu_model()}, {os.cpu_count()} cores, threads {args.threads}\n"
            f"2048^3 matmul GFLOP/s: {rate_line}\n"
            f"{args.warmup} warm-up + {args.steps} timed steps per framework and row, median; "
            f"ratio = the other's s/step / pro_jax's (> 1: pro_jax faster)")
  report = header + "\n\n" + "\n".join(lines)
  print("\n" + report)
  if args.results_dir:
    cmd = "python benchmarks/bench_dpo_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    details = "\n\n".join(f"### {n}\n\n```\n{r['header']}\n```" for n, r in out.items())
    path = append_report(args.results_dir, "dpo_matrix", cmd, header, lines, details)
    print(f"[bench] appended to {path}")
  return {"rates": rates, "rows": out}


if __name__ == "__main__":
  main()
