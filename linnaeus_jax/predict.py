"""`python -m linnaeus_jax.predict`: the command of `linnaeus_jax.inference.predict`, kept at its
old name (`python -m linnaeus_jax.inference.predict` works too)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("linnaeus_jax.inference.predict", run_name="__main__", alter_sys=True)
