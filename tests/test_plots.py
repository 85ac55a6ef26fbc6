import numpy as np
from PIL import Image

from linnaeus_jax import plots

TASKS = ["taxa_L10", "taxa_L20", "taxa_L30"]


def _results():
  return {
      "val_mask_meta": {"acc1/taxa_L10": 40.0, "acc1/taxa_L20": 55.0, "acc1/taxa_L30": 70.0},
      "val": {"acc1/taxa_L10": 60.0, "acc1/taxa_L20": 75.0, "acc1/taxa_L30": 90.0},
      "val_mask_temporal": {"acc1/taxa_L10": 50.0, "acc1/taxa_L20": 65.0, "acc1/taxa_L30": 80.0},
      "val_mask_elevation_spatial": {"acc1/taxa_L10": 45.0, "acc1/taxa_L20": 60.0,
                                     "acc1/taxa_L30": 75.0},
  }


def _check_image(img, path):
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert path.exists()
  decoded = np.asarray(Image.open(path))
  assert decoded.shape == img.shape
  np.testing.assert_array_equal(decoded, img)


def test_phase_order():
  phases = ["val_mask_meta", "val_mask_temporal", "val", "val_mask_elevation_spatial"]
  assert plots.phase_order(phases) == [
      "val", "val_mask_elevation_spatial", "val_mask_temporal", "val_mask_meta"]
  assert plots.phase_order({"val_mask_meta": 1, "val": 2}) == ["val", "val_mask_meta"]
  assert plots.phase_order(["val"]) == ["val"]
  assert plots.phase_order([]) == []


def test_row_normalize():
  counts = np.array([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
  out = plots.row_normalize(counts)
  np.testing.assert_allclose(out, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]])
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(plots.row_normalize(np.zeros((2, 2))), np.zeros((2, 2)))


def test_meta_ablation_writes_png_and_depends_on_values(tmp_path):
  path = tmp_path / "nested" / "dir" / "ablation.png"
  img = plots.meta_ablation(_results(), TASKS, str(path))
  _check_image(img, path)
  changed = _results()
  changed["val_mask_temporal"]["acc1/taxa_L20"] = 10.0
  img2 = plots.meta_ablation(changed, TASKS, str(tmp_path / "ablation2.png"))
  assert img2.shape == img.shape
  assert not np.array_equal(img, img2)


def test_meta_ablation_missing_value(tmp_path):
  results = _results()
  del results["val"]["acc1/taxa_L30"]
  path = tmp_path / "a.png"
  _check_image(plots.meta_ablation(results, TASKS, str(path)), path)


def test_confusion_matrix_small(tmp_path):
  counts = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 8]])
  path = tmp_path / "cm" / "small.png"
  img = plots.confusion_matrix(counts, ["a", "b", "c"], str(path), "L10")
  _check_image(img, path)
  img2 = plots.confusion_matrix(counts.T, ["a", "b", "c"], str(tmp_path / "t.png"), "L10")
  assert not np.array_equal(img, img2)


def test_confusion_matrix_sizes_are_capped(tmp_path):
  shapes = []
  for c in (1, 15, 41, 1000):
    rng = np.random.default_rng(c)
    counts = rng.integers(0, 5, size=(c, c)) + 20 * np.eye(c, dtype=np.int64)
    path = tmp_path / f"cm{c}.png"
    img = plots.confusion_matrix(counts, [f"class_{i}" for i in range(c)], str(path), f"C={c}")
    _check_image(img, path)
    shapes.append(img.shape)
  assert all(h <= 2000 and w <= 2200 for h, w, _ in shapes)
