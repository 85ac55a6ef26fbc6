import jax
import numpy as np
from flax import nnx

from linnaeus_jax import evaluate, models, preprocessing, sharding, train
from linnaeus_jax.data import images, pipeline

from conftest import tiny_config


def test_pass_over_padded_batches_equals_a_direct_forward(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.batch_size_val = 24  # the last batch is padded
  c, data = train.resolve(c)
  mesh = sharding.make_mesh(c)
  model = models.build(c, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  step = jax.jit(evaluate.make_eval_step(graphdef, c))
  got = evaluate.run(step, (params,), pipeline.eval_dataset(data, c), mesh, data.task_keys)
  assert len(data.val) % 24 and got["num_examples"] == len(data.val)

  reader = images.ImageReader(data.val_images, c.data.img_size)
  pixels = np.stack([reader(int(r), i) for r, i in zip(data.val.raw_row, data.val.image_id)])
  logits = jax.jit(lambda p, x, m, v: nnx.merge(graphdef, p)(x, m, v))(
      params, preprocessing.normalize(pixels), data.val.meta, data.val.meta_valid)
  for j, t in enumerate(data.task_keys):
    acc = 100 * np.mean(np.argmax(logits[t], -1) == data.val.labels[:, j])
    np.testing.assert_allclose(got[f"acc1/{t}"], acc, rtol=1e-6)
