"""`python -m linnaeus_jax.export`: the command of `linnaeus_jax.inference.export`, kept at its
old name (`python -m linnaeus_jax.inference.export` works too)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("linnaeus_jax.inference.export", run_name="__main__", alter_sys=True)
