"""Model registry: `config.model.name` -> class with `from_config(config, rngs)`."""

from flax import nnx

from linnaeus_jax.models.mformer_v1 import MFormerV1

MODELS = {"mFormerV1": MFormerV1}


def build(config, rngs, parents=None):
  """The configured model; `parents` (TaxonomyTree.parents) feeds hierarchical heads."""
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; known: {sorted(MODELS)}")
  return MODELS[name].from_config(config, rngs, parents)


def abstract(config, parents=None):
  """(graphdef, abstract params, abstract rest) of the configured model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: build(config, nnx.Rngs(0), parents)), nnx.Param, ...)
