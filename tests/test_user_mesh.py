"""Downstream code brings its own mesh: load_hf_model / load_checkpoint on meshes whose axes are not
named (data, fsdp, tensor), on 8 fake CPU devices. Parameters must equal the 1-device load exactly,
be sharded where the mesh has an axis for the role (and replicated where it has none), and the model
must run under `activation_sharding` on that mesh with the 1-device outputs."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from pro_jax.models.hf_io import load_hf_model
from pro_jax.sharding import MeshError, activation_sharding, batch_sharding, rules_for_mesh

FIXTURE = pathlib.Path(__file__).parent / "golden" / "fixtures" / "llama_gqa_untied"


def _mesh(shape, names):
  devices = np.asarray(jax.devices()[:int(np.prod(shape))], dtype=object).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


MESHES = {"fsdp8": ((8,), ("fsdp",)), "data2_model4": ((2, 4), ("data", "model")),
          "x2_y4": ((2, 4), ("x", "y"))}


def test_rules_for_mesh_default_mapping():
  r = dict(rules_for_mesh(_mesh((2, 4), ("data", "model"))))
  assert r["batch"] == "data" and r["embed"] is None and r["heads"] == "model" and r["vocab"] == "model"
  r = dict(rules_for_mesh(_mesh((8,), ("fsdp",))))
  assert r["batch"] == "fsdp" and r["embed"] == "fsdp" and r["heads"] is None and r["mlp"] is None
  r = dict(rules_for_mesh(_mesh((2, 2, 2), ("data", "fsdp", "tensor"))))
  assert r["batch"] == ("data", "fsdp") and r["embed"] == "fsdp" and r["heads"] == "tensor"
  r = dict(rules_for_mesh(_mesh((2, 4), ("x", "y"))))  # nothing recognisable: all replicated
  assert all(v is None for v in r.values())
  with pytest.raises(MeshError, match="look like the 'tensor' axis"):
    rules_for_mesh(_mesh((2, 4), ("model", "tp")))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_load_hf_model_on_a_user_mesh(name):
  mesh = _mesh(*MESHES[name])
  rules = (("embed", "x"), ("mlp", "y"), ("heads", "y"), ("kv_heads", "y"), ("vocab", "y"), ("batch", "x")) \
      if name == "x2_y4" else None
  model, params = load_hf_model(FIXTURE, mesh=mesh, rules=rules)
  _, ref = load_hf_model(FIXTURE)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  up_spec = params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec  # [layers, embed, mlp]
  embed_spec = params["embed"].sharding.spec  # [vocab, embed]
  expected = {"fsdp8": (P(None, "fsdp", None), P(None, "fsdp")),
              "data2_model4": (P(None, None, "model"), P("model", None)),
              "x2_y4": (P(None, "x", "y"), P("y", "x"))}[name]
  assert (tuple(up_spec) + (None,) * 3)[:3] == tuple(expected[0]), up_spec
  assert (tuple(embed_spec) + (None,) * 2)[:2] == tuple(expected[1]), embed_spec
  golden = np.load(FIXTURE / "golden.npz")
  rows = np.arange(8) % len(golden["tokens"])  # 8 rows: divisible by every batch split here
  tokens = jax.device_put(golden["tokens"][rows], batch_sharding(mesh))
  mask = golden["mask"][rows]
  with activation_sharding(mesh, rules):
    logits = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m).logits)(params, tokens, mask)
  valid = mask.astype(bool)
  assert np.abs(np.asarray(logits)[valid] - golden["logits"][rows][valid]).max() < 1e-4


@pytest.mark.slow
def test_load_checkpoint_on_user_meshes(tmp_path):
  from pro_jax.cli import main
  from pro_jax.train.checkpoint import load_checkpoint
  assert main(["train", "--config", "tiny_lm", "--workdir", str(tmp_path / "run"), "--config.total_steps=2",
               "--config.trainable=lora", "--config.model.lora.rank=4", "--config.checkpoint.every_steps=2",
               "--config.log.tensorboard=false", "--config.mesh.fsdp=2", "--config.mesh.data=4"]) == 0
  ref = load_checkpoint(tmp_path / "run")
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  ref_logits = np.asarray(ref.model.apply(ref.variables, tokens).logits)
  for shape, names in [((8,), ("fsdp",)), ((2, 4), ("data", "model"))]:
    mesh = _mesh(shape, names)
    ck = load_checkpoint(tmp_path / "run", mesh=mesh)
    assert sorted(ck.variables) == ["lora", "params"]
    for a, b in zip(jax.tree.leaves(ck.variables), jax.tree.leaves(ref.variables)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    embed = ck.variables["params"]["embed"]
    assert embed.sharding.mesh.axis_names == names
    assert ("fsdp" in tuple(embed.sharding.spec)) == (names == ("fsdp",))
    assert ("model" in tuple(embed.sharding.spec)) == (names == ("data", "model"))
    with activation_sharding(mesh):
      logits = jax.jit(lambda v, t: ck.model.apply(v, t).logits)(ck.variables, tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5)
