import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT
from linnaeus_jax import config as config_lib
from linnaeus_jax import sharding


def test_global_batch_is_sharded_on_the_batch_axes():
  c = config_lib.base_config()
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  batch = {"image": np.zeros((4, 2, 2, 3), np.uint8), "labels": {"t": np.arange(4)}}
  with jax.transfer_guard("disallow"):  # explicit transfers only, as in the train loop
    g = sharding.global_batch(batch, mesh)
  assert g["image"].shape == (4, 2, 2, 3)
  assert g["labels"]["t"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(g["labels"]["t"], np.arange(4))
  sharding.check_process_rows(mesh, 4)  # one process: all rows are local


def test_mesh_shape_from_config():
  c = config_lib.base_config()
  assert sharding.mesh_shape(c, 8) == (8, 1)
  c.mesh.fsdp = 4
  assert sharding.mesh_shape(c, 8) == (2, 4)
  c.mesh.data = 2
  assert sharding.mesh_shape(c, 8) == (2, 4)


def test_bad_mesh_lists_every_problem():
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp = 3, 3
  with pytest.raises(ValueError) as e:
    sharding.mesh_shape(c, 8)
  assert "mesh.fsdp=3 must be a positive divisor of the 8 devices" in str(e.value)
  assert "mesh.data=3 x mesh.fsdp=1 = 3 but 8 devices are visible" in str(e.value)
  c = config_lib.base_config()
  c.mesh.data = jax.device_count() + 1
  with pytest.raises(ValueError, match="devices are visible"):
    sharding.make_mesh(c)


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays():
  assert sharding.fsdp_spec((768, 3072), 4, 1024) == P(None, "fsdp")
  assert sharding.fsdp_spec((3072, 768), 4, 1024) == P("fsdp", None)
  assert sharding.fsdp_spec((7, 7, 1, 96), 4, 8192) == P()  # 4704 elements: below min_size
  assert sharding.fsdp_spec((7, 7, 1, 96), 4, 16) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((1001, 769), 4, 16) == P()  # nothing divisible
  assert sharding.fsdp_spec((1001, 768), 4, 16) == P(None, "fsdp")
  assert sharding.fsdp_spec((), 4, 0) == P()
  assert sharding.fsdp_spec((768, 3072), 1, 0) == P()  # fsdp off


NO_COLLECTIVES_IN_CONDITIONALS = r'''
import json, re
import jax, jax.numpy as jnp
from flax import nnx
from linnaeus_jax import config as config_lib, models, sharding
c = config_lib.base_config()
c.data.img_size = 32
c.data.meta.components.ELEVATION.enabled = True
for t, n in zip(c.data.task_keys_h5, (7, 5, 3, 2)):
  c.model.classification.heads[t].num_classes = n
m = c.model
m.convnext_stages.depths, m.convnext_stages.dims = [1, 1], [16, 24, 32, 48]
m.rope_stages.depths, m.rope_stages.dims, m.rope_stages.num_heads = [1, 1], [32, 48], [2, 2]
c.mesh.fsdp = 4
mesh = sharding.make_mesh(c)
graphdef, params, rest = models.abstract(c)
params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
params_sharding = sharding.state_sharding(mesh, params, 64)
comps = config_lib.enabled_components(c)
batch = (jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
         {n: jax.ShapeDtypeStruct((8, comp.dim), jnp.float32) for n, comp in comps},
         jax.ShapeDtypeStruct((8, len(comps)), bool))

def loss(p, image, meta, valid):
  out = nnx.merge(graphdef, p, rest)(image, meta, valid, train=True, key=jax.random.PRNGKey(0))
  return sum(jnp.sum(v ** 2) for v in out.values())
rows = sharding.batch_sharding(mesh)
hlo = jax.jit(jax.value_and_grad(loss), in_shardings=(params_sharding, rows, rows, rows)).lower(
    params, *batch).compile().as_text()
bodies = {m.group(1): m.group(2) for m in re.finditer(r"^(%[\w.\-]+) .*?\{\n(.*?)^\}", hlo,
                                                      re.S | re.M)}
coll = re.compile(r" (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                  r"(?:-start)?\(")
branches = [b for line in re.findall(r" conditional\(.*", hlo) for b in re.findall(
    r"(?:branch_computations=\{|true_computation=|false_computation=|, )(%[\w.\-]+)",
    line.split("conditional(", 1)[1].split(")", 1)[1])]
inside = [len(coll.findall(bodies.get(b, ""))) for b in branches]
print(json.dumps({"split": sum(s.spec != jax.sharding.PartitionSpec()
                               for s in jax.tree.leaves(params_sharding)),
                  "collectives": len(coll.findall(hlo)), "inside_conditionals": inside}))
'''


@pytest.mark.slow  # a subprocess with 4 CPU devices
def test_no_collectives_inside_conditionals_with_a_split_state():
  """The model's forward and backward on fsdp=4: XLA puts the all-gathers of a split parameter
  where it is used, and a `platform_dependent` around that use (a conditional XLA keeps once it
  holds collectives) deadlocked FSDP across processes at the first step (XLA's CPU runtime did
  not order those collectives with the rest of the step's). The platform-specific variants are
  for one device only (models/layers.py), so the compiled step has none."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", NO_COLLECTIVES_IN_CONDITIONALS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  found = json.loads(res.stdout.strip().splitlines()[-1])
  assert found["split"] > 10 and found["collectives"] > 0, found  # the check sees collectives
  assert not any(found["inside_conditionals"]), found
