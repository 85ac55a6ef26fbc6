"""Fine-tuning on the synthetic data (docs/experiments.md): the demo model trained on the demo
dataset initialises a run on another synthetic dataset with more species (60 instead of 48,
other taxon ids, ranges and seasons), against the same run from scratch:

    python -m linnaeus_jax.main --config=configs/demo.py --workdir=runs/ft_source
    python -m linnaeus_jax.main --config=configs/demo_finetune.py --workdir=runs/ft_scratch
    python -m linnaeus_jax.main --config=configs/demo_finetune.py --workdir=runs/ft_init \
        --config.model.init.checkpoint=runs/ft_source
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "demo.py")
  o = c.data.synthetic.options
  o.species_per_genus, o.seed = 5, 1
  v = c.schedule.validation
  v.interval_steps = 50  # the learning curve
  return c
