"""Model definitions (Flax Linen) and their import / export."""

# registers the DistilBERT / BART classifiers with load_hf_model (hf_io.ARCHITECTURE_LOADERS)
from pro_jax.models import encoders  # noqa: F401

from pro_jax.models.config import LoRAConfig, ModelConfig, RopeScaling
from pro_jax.models.transformer import (ModelOutput, Transformer, abstract_variables, init_cache,
                                        init_variables, logical_axes)

__all__ = ["LoRAConfig", "ModelConfig", "RopeScaling", "ModelOutput", "Transformer", "abstract_variables",
           "init_cache", "init_variables", "logical_axes"]
