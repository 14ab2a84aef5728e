"""The model on 8 fake CPU devices: parameters placed by their logical axes, the batch over
(data, fsdp), activation constraints on; outputs and gradients equal the 1-device ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pro_jax.models import ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.models.generate import generate
from pro_jax.sharding import activation_sharding, batch_sharding, make_mesh, param_shardings

V = 64
ARCHS = {
    "llama": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64),
    "gpt2": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, arch="gpt2", max_seq_len=32),
}
MESHES = {"fsdp4_tensor2": (1, 4, 2), "data2_fsdp2_tensor2": (2, 2, 2)}
B, L = 8, 12


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"


@functools.lru_cache(maxsize=None)
def _variables(config):
  variables = jax.jit(functools.partial(init_variables, Transformer(config)))(jax.random.key(0))
  return jax.device_get(variables)  # host numpy: placed explicitly below


def _batch():
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, L), 0, V), np.int32)
  mask = np.ones((B, L), np.int32)
  mask[1, :4] = 0  # left padding
  mask[2, 9:] = 0  # right padding
  return tokens, mask


def _loss(model, variables, tokens, mask):
  logits = model.apply(variables, tokens, mask).logits
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1) * mask[:, 1:, None])


def _place(config, mesh):
  model = Transformer(config)
  shardings = param_shardings(logical_axes(model), abstract_variables(model), mesh)
  variables = jax.device_put(_variables(config), shardings)
  tokens, mask = _batch()
  return model, variables, jax.device_put(tokens, batch_sharding(mesh)), jax.device_put(mask, batch_sharding(mesh))


@functools.lru_cache(maxsize=None)
def _reference(config, what):
  """1-device results (default device, no mesh)."""
  model = Transformer(config)
  tokens, mask = _batch()
  variables = jax.device_put(_variables(config), jax.devices()[0])
  if what == "logits":
    return np.asarray(jax.jit(lambda v, t, m: model.apply(v, t, m).logits)(variables, tokens, mask))
  return jax.device_get(jax.jit(jax.grad(functools.partial(_loss, model)))(variables, tokens, mask))


def _spec(x, ndim=None):
  """Full-length PartitionSpec tuple of an array (or of a NamedSharding for `ndim` dims)."""
  spec = x.spec if ndim is not None else x.sharding.spec
  ndim = x.ndim if ndim is None else ndim
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_matches_single_device(arch, mesh_name):
  config = ARCHS[arch]
  mesh = make_mesh(*MESHES[mesh_name])
  model, variables, tokens, mask = _place(config, mesh)
  with activation_sharding(mesh):
    logits = jax.jit(lambda v, t, m: model.apply(v, t, m).logits)(variables, tokens, mask)
  np.testing.assert_allclose(np.asarray(logits), _reference(config, "logits"), atol=1e-5, rtol=0)

  # The parameters really are sharded: FSDP on embed, tensor on heads / mlp / vocab.
  params = variables["params"]
  attn_in = params["layers"]["attn"]["q_proj" if arch == "llama" else "c_attn"]["kernel"]
  mlp_out = params["layers"]["mlp"]["down_proj" if arch == "llama" else "c_proj"]["kernel"]
  assert _spec(attn_in) == (None, "fsdp", "tensor")  # [layers, embed, heads]
  assert _spec(mlp_out) == (None, "tensor", "fsdp")  # [layers, mlp, embed]
  assert _spec(params["embed"]) == ("tensor", "fsdp")  # [vocab, embed]
  n_fsdp, n_tensor = MESHES[mesh_name][1:]
  shard = attn_in.addressable_shards[0].data.shape
  assert shard == (attn_in.shape[0], attn_in.shape[1] // n_fsdp, attn_in.shape[2] // n_tensor)
  assert tokens.sharding.spec == P(("data", "fsdp"), None)


def test_gradient_matches_single_device():
  """One gradient (the GQA Llama on the 3-axis mesh): every leaf equals the 1-device gradient."""
  config = ARCHS["llama"]
  mesh = make_mesh(*MESHES["data2_fsdp2_tensor2"])
  model, variables, tokens, mask = _place(config, mesh)
  with activation_sharding(mesh):
    grads = jax.jit(jax.grad(functools.partial(_loss, model)))(variables, tokens, mask)
  ref = _reference(config, "grads")
  for (path, g), r in zip(jax.tree.flatten_with_path(grads)[0], jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_non_divisible_dimensions_are_replicated():
  """vocab 37, d_model 30, mlp 45 on (fsdp=4, tensor=2): those dimensions stay whole, no error."""
  config = ModelConfig(vocab_size=37, d_model=30, n_layers=2, n_heads=3, mlp_dim=45, n_kv_heads=1)
  mesh = make_mesh(1, 4, 2)
  model = Transformer(config)
  shardings = param_shardings(logical_axes(model), abstract_variables(model), mesh)
  params = shardings["params"]
  assert _spec(params["embed"], 2) == (None, None)  # 37 % 2, 30 % 4
  assert _spec(params["layers"]["attn"]["q_proj"]["kernel"], 3) == (None, None, "tensor")  # 3 heads * 10
  assert _spec(params["layers"]["attn"]["k_proj"]["kernel"], 3) == (None, None, "tensor")  # 1 kv head * 10
  assert _spec(params["layers"]["mlp"]["up_proj"]["kernel"], 3) == (None, None, None)  # 45 % 2
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, L), 0, 37), np.int32)
  mask = np.ones((B, L), np.int32)
  host = jax.device_get(jax.jit(functools.partial(init_variables, model))(jax.random.key(0)))
  ref = jax.jit(lambda v, t: model.apply(v, t, mask).logits)(host, tokens)
  variables = jax.device_put(host, shardings)
  with activation_sharding(mesh):
    out = jax.jit(lambda v, t: model.apply(v, t, mask).logits)(variables, jax.device_put(tokens, batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_generate_with_sharded_params():
  """generate() under a mesh with sharded parameters and batch: same tokens as on one device."""
  config = ARCHS["llama"]
  mesh = make_mesh(2, 2, 2)
  model, variables, _, _ = _place(config, mesh)
  tokens, mask = _batch()
  mask = np.maximum.accumulate(mask, axis=1)  # left padding only
  kw = dict(max_new_tokens=6, rng=jax.random.key(2), temperature=0.8, top_k=10)
  ref = generate(model, jax.device_put(_variables(config), jax.devices()[0]), tokens, mask, **kw)
  with activation_sharding(mesh):
    out = generate(model, variables, jax.device_put(tokens, batch_sharding(mesh)),
                   jax.device_put(mask, batch_sharding(mesh)), **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(ref.tokens_BxN))
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.asarray(ref.logprobs_BxN), atol=1e-5)
