"""Model definitions (Flax Linen) and their import / export."""

from pro_jax.models.config import LoRAConfig, ModelConfig, RopeScaling
from pro_jax.models.transformer import (ModelOutput, Transformer, abstract_variables, init_cache,
                                        init_variables, logical_axes)

__all__ = ["LoRAConfig", "ModelConfig", "RopeScaling", "ModelOutput", "Transformer", "abstract_variables",
           "init_cache", "init_variables", "logical_axes"]
