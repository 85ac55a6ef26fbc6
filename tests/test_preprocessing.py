import datetime as dt
import json
import os

import numpy as np
from PIL import Image

from linnaeus_jax import preprocessing
from linnaeus_jax.data import encoders

from conftest import tiny_config

LAYOUT = [
    {"name": "TEMPORAL", "dim": 4, "encoder": "cyclic_date",
     "columns": ["month_sin", "month_cos", "hour_sin", "hour_cos"]},
    {"name": "SPATIAL", "dim": 3, "encoder": "unit_sphere",
     "columns": ["spatial_x", "spatial_y", "spatial_z"]},
    {"name": "ELEVATION", "dim": 4, "encoder": "elevation", "scales": [100.0, 1000.0],
     "columns": ["elev_100_sin", "elev_100_cos", "elev_1000_sin", "elev_1000_cos"]},
]


def test_request_metadata_is_encoded_with_the_training_formulas():
  meta, valid, warnings = preprocessing.encode_metadata(
      LAYOUT, {"lat": 30.0, "lon": -60.0, "datetime_utc": "2021-03-10T18:30:00+02:00",
               "elevation_m": 250.0})
  assert valid.tolist() == [True, True, True] and warnings == []
  # 18:30 at +02:00 is 16:30 UTC; month 3.
  np.testing.assert_allclose(meta["TEMPORAL"], encoders.temporal(month=3, hour=16), atol=1e-6)
  np.testing.assert_allclose(meta["SPATIAL"], [np.cos(np.pi / 6) * np.cos(-np.pi / 3),
                                               np.cos(np.pi / 6) * np.sin(-np.pi / 3), 0.5],
                             atol=1e-6)
  np.testing.assert_allclose(meta["ELEVATION"], encoders.elevation([250.0], [100, 1000])[0],
                             atol=1e-6)
  meta, _, _ = preprocessing.encode_metadata(
      LAYOUT, {"datetime_utc": dt.datetime(2021, 12, 31, 23, 0)})
  np.testing.assert_allclose(meta["TEMPORAL"], encoders.temporal(month=12, hour=23),
                             atol=1e-6)


def test_invalid_values_are_listed_and_zeroed():
  meta, valid, warnings = preprocessing.encode_metadata(
      LAYOUT, {"lat": 95.0, "lon": 0.0, "datetime_utc": 20210310, "elevation_m": float("nan")})
  assert valid.tolist() == [False, False, False]
  assert warnings == ["TEMPORAL invalid: datetime_utc not a datetime or ISO string: 20210310",
                      "SPATIAL invalid: lat/lon out of range: 95.0, 0.0",
                      "ELEVATION invalid: elevation_m not finite: nan"]
  assert all(not v.any() for v in meta.values())


def test_record_reads_the_layout_from_the_labels_file(small_dataset):
  c = tiny_config(small_dataset[0])
  rec = preprocessing.record(c)
  assert rec["image"]["size"] == 32 and rec["image"]["value_range"] == [0.0, 1.0]
  by_name = {m["name"]: m for m in rec["metadata"]}
  assert [m["name"] for m in rec["metadata"]] == ["TEMPORAL", "SPATIAL", "ELEVATION"]
  assert by_name["TEMPORAL"]["columns"][:2] == ["month_sin", "month_cos"]
  scales = by_name["ELEVATION"]["scales"]
  assert len(scales) * 2 == by_name["ELEVATION"]["dim"]
  assert by_name["ELEVATION"]["columns"] == encoders.elevation_column_names(scales)
  assert os.path.exists(c.data.h5.labels_path)


def test_normalize_scales_to_0_1_then_standardises_per_channel():
  x = np.array([[[[0, 51, 255]]]], np.uint8)
  np.testing.assert_allclose(preprocessing.normalize(x), [[[[0.0, 0.2, 1.0]]]], atol=1e-7)
  np.testing.assert_allclose(preprocessing.normalize(x, (0.5, 0.2, 0.5), (0.5, 0.1, 0.25)),
                             [[[[-1.0, 0.0, 2.0]]]], atol=1e-6)


def test_record_holds_the_configs_mean_and_std(small_dataset):
  c = tiny_config(small_dataset[0])
  rec = preprocessing.record(c)
  assert rec["image"]["mean"] is None and rec["image"]["std"] is None  # data.image_mean ()
  assert preprocessing.image_stats(c) == preprocessing.recorded_stats(rec) == (None, None)
  c.data.image_mean, c.data.image_std = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)
  rec = json.loads(json.dumps(preprocessing.record(c)))  # as preprocessing.json holds it
  assert rec["image"]["mean"] == [0.5, 0.25, 0.125] and rec["image"]["std"] == [0.2, 0.4, 0.8]
  assert rec["image"]["value_range"] == [0.0, 1.0] and rec["image"]["size"] == 32
  assert (preprocessing.image_stats(c) == preprocessing.recorded_stats(rec)
          == ((0.5, 0.25, 0.125), (0.2, 0.4, 0.8)))
  del rec["image"]["mean"], rec["image"]["std"]  # a record from before mean/std: [0, 1]
  assert preprocessing.recorded_stats(rec) == (None, None)


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
  """A photo-like HxWx3 uint8 image: smooth gradients, a dark disc, a bright band, noise."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  a = np.stack([128 + 90 * np.sin(x / w * 3.1 + 0.5) * np.cos(y / h * 2.3),
                100 + 80 * x / w + 40 * np.sin((x + y) / 97),
                150 - 70 * y / h + 30 * np.cos(x / 53)], -1)
  a[(x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.2 * h) ** 2] *= 0.45
  a[int(0.7 * h):int(0.8 * h)] += 50
  a += np.random.default_rng(seed).normal(0, 12, a.shape)
  return np.clip(a, 0, 255).astype(np.uint8)


def _saved(tmp_path, w, h, fmt="JPEG"):
  path = str(tmp_path / f"img_{w}x{h}.{fmt.lower()}")
  Image.fromarray(_photo(w, h)).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  with open(path, "rb") as f:
    return path, f.read()


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
  path, data = _saved(tmp_path, 2048, 1536)
  with Image.open(path) as im:
    im.draft("RGB", (384, 384))
    assert im.size == (512, 384)  # DCT scale 1/4
    expected = np.asarray(im.resize((384, 384), Image.Resampling.BOX))
  full = preprocessing.to_rgb_uint8(path, 384, draft=False)
  for src in (path, data):
    out = preprocessing.to_rgb_uint8(src, 384)
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384, draft=False), full)
    diff = np.abs(out.astype(int) - full.astype(int))
    assert (diff > 0).any()  # the reduced decode really happened
    assert diff.mean() < 2.0  # measured: 1.02 levels


def test_jpegs_under_twice_the_size_on_either_side_are_decoded_in_full(tmp_path):
  for w, h in ((700, 700), (767, 1536), (1536, 767)):
    path, data = _saved(tmp_path, w, h)
    full = preprocessing.to_rgb_uint8(path, 384, draft=False)
    for src in (path, data):
      np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), full)
  path, data = _saved(tmp_path, 768, 768)  # exactly twice: decoded at 1/2, to 384 directly
  with Image.open(path) as im:
    im.draft("RGB", (384, 384))
    expected = np.asarray(im.convert("RGB"))
  assert expected.shape == (384, 384, 3)
  for src in (path, data):
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), expected)
  assert (expected != preprocessing.to_rgb_uint8(path, 384, draft=False)).any()


def test_large_pngs_are_unaffected_by_draft(tmp_path):
  path, data = _saved(tmp_path, 2048, 2048, "PNG")
  full = preprocessing.to_rgb_uint8(path, 384, draft=False)
  for src in (path, data):
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), full)
  np.testing.assert_array_equal(
      full, np.asarray(Image.fromarray(_photo(2048, 2048)).resize((384, 384),
                                                                  Image.Resampling.BOX)))


def _asymmetric(w: int = 24, h: int = 16) -> np.ndarray:
  """An upright HxWx3 picture that each of the 8 turns and flips changes: red rises to the
  right, green downwards, blue is bright around the top-left corner only (smooth, so JPEG
  keeps it well)."""
  y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  blue = 60 + 140 * np.exp(-4 * (x ** 2 + y ** 2))
  return np.stack([230 * x, 225 * y, blue], -1).round().astype(np.uint8)


# What a reader that ignores (or misreads) the tag would show instead: the 7 other dihedral
# turns of the upright picture.
WRONG_TURNS = [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
               Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
               Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE]


def test_exif_orientation_is_applied_for_paths_bytes_and_pil_images(tmp_path):
  """Each of the 8 EXIF orientations, stored as a camera stores it (`sideways`), decodes to the
  upright picture: PNG exactly, JPEG within its loss; a wrong turn would differ a lot."""
  from inat_layout import sideways  # pylint: disable=g-import-not-at-top
  rgb = _asymmetric()  # 24 wide, 16 high: squashed to 16 x 16 by to_rgb_uint8
  Image.fromarray(rgb).save(tmp_path / "upright.png")
  want = preprocessing.to_rgb_uint8(str(tmp_path / "upright.png"), 16)
  np.testing.assert_array_equal(want, np.asarray(Image.fromarray(rgb).resize(
      (16, 16), Image.Resampling.BOX)))
  wrong = [preprocessing.to_rgb_uint8(Image.fromarray(rgb).transpose(t), 16) for t in WRONG_TURNS]
  for w in wrong:  # the picture tells every turn apart, even squashed
    assert np.abs(w.astype(int) - want).mean() > 20
  for o in range(1, 9):
    stored = sideways(rgb, o)
    assert stored.size == ((24, 16) if o <= 4 else (16, 24))
    for fmt in ("PNG", "JPEG"):
      path = str(tmp_path / f"o{o}.{fmt.lower()}")
      stored.save(path, fmt, exif=stored.info["exif"], **({"quality": 95} if fmt == "JPEG"
                                                          else {}))
      with Image.open(path) as im:
        assert im.getexif()[0x0112] == o  # the tag survived the save
        from_pil = preprocessing.to_rgb_uint8(im, 16)
      with open(path, "rb") as f:
        data = f.read()
      outs = [preprocessing.to_rgb_uint8(path, 16), preprocessing.to_rgb_uint8(data, 16),
              from_pil]
      for out in outs:
        assert out.shape == (16, 16, 3)
        if fmt == "PNG":
          np.testing.assert_array_equal(out, want, err_msg=f"orientation {o}")
        else:
          assert np.abs(out.astype(int) - want).mean() < 3, o  # measured: 1.2 to 1.5 levels
          for w in wrong:
            assert np.abs(out.astype(int) - w).mean() > 20, o
    # An in-memory image whose info carries the tag (as `sideways` makes it) is turned too.
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(stored, 16), want)


def test_exif_orientation_survives_the_reduced_jpeg_decode(tmp_path):
  """A large sideways JPEG is drafted at 1/4 scale, then turned: the same picture as its
  upright twin decoded the same way."""
  from inat_layout import sideways  # pylint: disable=g-import-not-at-top
  rgb = np.asarray(Image.fromarray(_asymmetric()).resize((96, 64), Image.Resampling.BILINEAR))
  Image.fromarray(rgb).save(tmp_path / "up.jpg", quality=95)
  want = preprocessing.to_rgb_uint8(str(tmp_path / "up.jpg"), 16)
  for o in (3, 6, 8):
    stored = sideways(rgb, o)
    stored.save(tmp_path / f"o{o}.jpg", quality=95, exif=stored.info["exif"])
    with Image.open(tmp_path / f"o{o}.jpg") as im:
      im.draft("RGB", (16, 16))
      assert max(im.size) == 24  # both sides >= 32: decoded at 1/4
    out = preprocessing.to_rgb_uint8(str(tmp_path / f"o{o}.jpg"), 16)
    assert np.abs(out.astype(int) - want).mean() < 3, o  # measured: 0.3


def test_upright_keeps_an_image_without_a_turn():
  img = Image.fromarray(_asymmetric())
  assert preprocessing.upright(img) is img  # no EXIF
  exif = Image.Exif()
  exif[0x0112] = 1
  img.info["exif"] = exif.tobytes()
  assert preprocessing.upright(img) is img  # orientation 1: as stored
  img = Image.fromarray(_asymmetric())
  img.info["exif"] = b"Exif\x00\x00garbage"  # a corrupt block: shown as stored
  assert preprocessing.upright(img) is img
  from inat_layout import sideways  # pylint: disable=g-import-not-at-top
  turned = preprocessing.upright(sideways(_asymmetric(), 6))
  assert turned.size == (24, 16)
  np.testing.assert_array_equal(np.asarray(turned), _asymmetric())


def test_record_in_two_file_mode_reads_the_training_file(small_dataset, tmp_path):
  """Without data.h5.labels_path the layout comes from train_labels_path: the same record as
  that file given as the one labels file."""
  c = tiny_config(small_dataset[0])
  one_file = preprocessing.record(c)
  c.data.h5.train_labels_path = c.data.h5.labels_path
  c.data.h5.val_labels_path = str(tmp_path / "absent_val.h5")  # not read for the record
  c.data.h5.labels_path = ""
  two_files = preprocessing.record(c)
  assert two_files == one_file
  assert [m["name"] for m in two_files["metadata"]] == ["TEMPORAL", "SPATIAL", "ELEVATION"]
