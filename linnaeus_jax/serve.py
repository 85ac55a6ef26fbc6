"""`python -m linnaeus_jax.serve`: the command of `linnaeus_jax.inference.serve`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("linnaeus_jax.inference.serve", run_name="__main__", alter_sys=True)
