import io
import os
import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from linnaeus_jax import preprocessing
from linnaeus_jax.data import images, labels, shards

from conftest import tiny_config

# (width, height, mode) of the test images: landscape, portrait, small, grey, square.
SIZES = [(80, 50, "RGB"), (40, 72, "RGB"), (20, 30, "RGB"), (64, 64, "L"), (33, 90, "RGB"),
         (50, 50, "RGB"), (90, 45, "RGB")]


def _jpegs(folder, sizes=SIZES, seed=0):
  """Random-noise JPEGs (smooth enough to be realistic: noise upsampled 4x); their paths."""
  folder.mkdir(exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h, mode) in enumerate(sizes):
    c = 3 if mode == "RGB" else 1
    noise = rng.integers(0, 256, (-(-h // 4), -(-w // 4), c), dtype=np.uint8)
    a = np.repeat(np.repeat(noise, 4, 0), 4, 1)[:h, :w]
    img = Image.fromarray(a[..., 0] if c == 1 else a, mode)
    paths.append(str(folder / f"img{i}.jpg"))
    img.save(paths[-1], format="JPEG", quality=90)
  return paths


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_pack_tiles_rows_in_order_and_copies_bytes(tmp_path):
  paths = _jpegs(tmp_path / "src")
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=3, progress=False)
  assert [os.path.basename(p) for p in out] == [f"images-0000{i}-of-00003.h5" for i in range(3)]
  assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in out)
  expected = [(0, 3), (3, 3), (6, 1)]
  for p, (first, num) in zip(out, expected):
    with h5py.File(p, "r") as h5:
      assert dict(h5.attrs) == {"first_row": first, "num_rows": num, "total_rows": 7,
                                "encoding": "encoded"}
      offsets = h5["offsets"][:]
      assert len(offsets) == num + 1 and offsets[-1] == h5["bytes"].shape[0]
      for j in range(num):  # the files' bytes as they are, in order
        assert h5["bytes"][offsets[j]:offsets[j + 1]].tobytes() == _read(paths[first + j])
  for loc in (str(tmp_path / "out" / "images-*.h5"), ",".join(reversed(out)), out[::-1]):
    reader = shards.ShardReader(loc)
    assert reader.files == out and list(reader.starts) == [0, 3, 6] and len(reader) == 7
    assert [reader.encoded(i) for i in range(7)] == [_read(p) for p in paths]
  with pytest.raises(IndexError, match="row 7 outside"):
    reader.encoded(7)


def test_rows_stay_in_order_across_batches_and_shards(tmp_path):
  """Many rows: several reading/writing batches per shard, a short last one, empty files."""
  rng = np.random.default_rng(1)
  (tmp_path / "src").mkdir()
  paths, blobs = [], []
  for i in range(300):  # bytes are copied as they are with max_side 0: any content will do
    blobs.append(rng.integers(0, 256, int(rng.integers(0, 300)) if i % 50 else 0,
                              dtype=np.uint8).tobytes())
    paths.append(str(tmp_path / "src" / f"{i}.bin"))
    with open(paths[-1], "wb") as f:
      f.write(blobs[-1])
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=130, progress=False, num_workers=3)
  reader = shards.ShardReader(out)
  assert len(out) == 3 and list(reader.starts) == [0, 130, 260]
  assert [reader.encoded(i) for i in range(300)] == blobs


def test_reader_gives_the_pixels_of_the_file(tmp_path):
  paths = _jpegs(tmp_path / "src")
  shards.pack(paths, str(tmp_path / "out"), shard_size=2, progress=False, num_workers=2)
  glob = str(tmp_path / "out" / "images-*.h5")
  assert images.kind(glob) == "shards" and images.is_h5(glob)
  reader = images.ImageReader(glob, 24)
  assert reader.kind == "shards" and not reader.h5
  for i, p in enumerate(paths):
    np.testing.assert_array_equal(reader(i, "unused"), preprocessing.to_rgb_uint8(p, 24))
  assert reader.shards._open  # opened on use; a copy for another process opens its own
  clone = pickle.loads(pickle.dumps(reader))
  assert not clone.shards._open
  np.testing.assert_array_equal(clone(5, "unused"), preprocessing.to_rgb_uint8(paths[5], 24))
  # One shard file on its own is a shard set too (by its attributes, not its name).
  one = str(tmp_path / "out" / "images-00000-of-00004.h5")
  assert images.kind(one) == "shards" and images.check_h5(one, 7)[0].startswith("rows 2..6")


def test_at_most_max_open_shards_stay_open(tmp_path):
  paths = _jpegs(tmp_path / "src")
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=2, progress=False)
  reader = shards.ShardReader(out, max_open=2)
  for i in [0, 2, 4, 6, 1, 3]:
    assert reader.encoded(i) == _read(paths[i])
    assert len(reader._open) <= 2
  assert list(reader._open) == [0, 1]  # the least recently used were closed
  open_files = []
  for fd in os.listdir("/proc/self/fd"):
    try:
      open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    except FileNotFoundError:  # the descriptor listdir used
      pass
  # The evicted shards were closed (this test's files only: another test's training run may
  # still hold its own shards open in this process).
  assert sorted(f for f in open_files if f.startswith(str(tmp_path))) == out[:2]


def test_shards_written_by_other_tools_chunked_or_compressed(tmp_path):
  """`bytes` may be chunked and compressed (then read through h5py instead of os.pread)."""
  paths = _jpegs(tmp_path / "src")
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=4, progress=False)
  with h5py.File(out[1], "a") as h5:
    data = h5["bytes"][:]
    del h5["bytes"]
    h5.create_dataset("bytes", data=data, chunks=(1000,), compression="gzip")
  reader = shards.ShardReader(out)
  assert [reader.encoded(i) for i in range(7)] == [_read(p) for p in paths]
  assert reader._open[0].fd is not None and reader._open[1].fd is None


def test_max_side_shrinks_the_short_side_and_keeps_small_images(tmp_path):
  paths = _jpegs(tmp_path / "src")
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=4, max_side=32, progress=False)
  reader = shards.ShardReader(out)
  for i, ((w, h, _), p) in enumerate(zip(SIZES, paths)):
    data = reader.encoded(i)
    if min(w, h) <= 32:
      assert data == _read(p)
      continue
    with Image.open(io.BytesIO(data)) as img:
      assert img.format == "JPEG" and img.mode == "RGB"
      short, long_ = sorted(img.size)
      assert short == 32 and long_ == round(max(w, h) * 32 / min(w, h))
      assert (img.size[0] < img.size[1]) == (w < h)  # orientation kept
      shrunk = np.asarray(img.convert("L"), np.float32)
    with Image.open(p) as src:  # the same picture: the source shrunk by the same filter
      ref = src.convert("RGB").resize(img.size, Image.Resampling.BOX)
    # Luma: JPEG keeps colour at half resolution (4:2:0), which blurs this noise's chroma.
    assert np.abs(shrunk - np.asarray(ref.convert("L"), np.float32)).mean() < 3


def test_unreadable_files_fail_naming_them_and_leave_nothing(tmp_path):
  paths = _jpegs(tmp_path / "src")
  out_dir = tmp_path / "out"
  with pytest.raises(shards.ShardError, match="gone.jpg.*cannot be read"):
    shards.pack(paths + [str(tmp_path / "src" / "gone.jpg")], str(out_dir), shard_size=2,
                progress=False)
  assert os.listdir(out_dir) == []  # no shard, no temporary file
  (tmp_path / "src" / "bad.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(shards.ShardError, match="bad.jpg.*cannot be decoded"):
    shards.pack(paths[:1] + [str(tmp_path / "src" / "bad.jpg")], str(out_dir), max_side=16,
                progress=False)
  assert os.listdir(out_dir) == []
  with pytest.raises(shards.ShardError, match="no images"):
    shards.pack([], str(out_dir))


def test_an_existing_set_is_replaced_only_with_overwrite(tmp_path, capsys):
  paths = _jpegs(tmp_path / "src")
  out_dir = str(tmp_path / "out")
  shards.pack(paths, out_dir, shard_size=2, progress=False)
  (tmp_path / "out" / "other-00000-of-00001.h5").write_bytes(b"")  # another prefix: kept
  with pytest.raises(shards.ShardError, match="already holds 4 shard file"):
    shards.pack(paths, out_dir, shard_size=4, progress=False)
  new = shards.pack(paths[:5], out_dir, shard_size=4, overwrite=True)
  assert "packed 5/5 images" in capsys.readouterr().err  # the progress line
  assert sorted(os.listdir(out_dir)) == ["images-00000-of-00002.h5", "images-00001-of-00002.h5",
                                         "other-00000-of-00001.h5"]
  assert shards.ShardReader(os.path.join(out_dir, "images-*.h5")).files == new


def test_layout_problems_are_listed_together(tmp_path):
  paths = _jpegs(tmp_path / "src")
  out = shards.pack(paths, str(tmp_path / "out"), shard_size=2, progress=False)
  assert shards.check(out, 7) == []
  problems = shards.check([out[0], out[2], out[3]], 8)
  assert problems == ["rows 2..3 are in no shard (gap before " + out[2] + ")",
                      "the image shards hold 7 rows but the labels file has 8"]
  with h5py.File(out[2], "r+") as h5:
    h5.attrs["first_row"] = 3
  with h5py.File(out[3], "r+") as h5:
    h5.attrs["total_rows"] = 9
  problems = shards.check(out, 7)
  assert "shards disagree on total_rows: [7, 9]" in problems
  assert "the image shards hold 9 rows but the labels file has 7" in problems
  with h5py.File(out[3], "r+") as h5:
    h5.attrs["total_rows"] = 7
  assert shards.check(out, 7) == [f"{out[2]}: rows 3..3 overlap the previous shard",
                                  f"rows 5..5 are in no shard (gap before {out[3]})"]
  with pytest.raises(shards.ShardError, match="overlap the previous shard"):
    shards.ShardReader(out)
  missing = str(tmp_path / "out" / "nothing-*.h5")
  problems = shards.check(f"{out[0]},{missing}", 7)
  assert problems == [f"no image shard files match {missing!r}",
                      "rows 2..6 are in no shard (total_rows 7)"]
  with h5py.File(out[0], "r+") as h5:
    h5["offsets"][1] = 10**6
  with h5py.File(out[1], "r+") as h5:
    del h5.attrs["num_rows"]
  problems = shards.check(out, 7)
  assert problems[0].startswith(f"{out[0]}: offsets must rise from 0 to the length of bytes")
  assert problems[0].endswith("and decrease somewhere")
  assert problems[1].startswith(f"{out[1]}: missing attribute(s) num_rows")


def test_decoding_failures_follow_the_missing_image_policy(tmp_path):
  paths = _jpegs(tmp_path / "src", SIZES[:2])
  (tmp_path / "src" / "bad.jpg").write_bytes(b"not a jpeg")  # copied as it is (max_side 0)
  out = shards.pack(paths + [str(tmp_path / "src" / "bad.jpg")], str(tmp_path / "out"),
                    shard_size=2, progress=False)
  with pytest.raises(images.MissingImagesError, match="images-00001-of-00002.h5 row 0"):
    images.ImageReader(",".join(out), 16)(2, "unused")
  assert images.ImageReader(",".join(out), 16, policy="skip")(2, "unused") is None
  assert not images.ImageReader(",".join(out), 16, policy="placeholder")(2, "unused").any()
  assert images.ImageReader(",".join(out), 16, policy="skip")(1, "x").shape == (16, 16, 3)


def test_start_up_checks_report_shard_problems_with_the_others(small_dataset, tmp_path):
  out, paths = small_dataset
  with h5py.File(paths["labels_path"], "r") as h5:
    ids = h5["img_identifiers"][:]
  files = [images.file_path(paths["images_dir"], i, ".jpg") for i in ids[:50]]
  shard_files = shards.pack(files, str(tmp_path), shard_size=20, progress=False)
  c = tiny_config(out)
  c.data.hybrid.use_hybrid = False
  c.data.h5.images_path = ",".join(shard_files[1:])  # no rows 0..19; 50 rows, not len(ids)
  with pytest.raises(labels.DataError) as e:
    labels.load(c)
  msg = str(e.value)
  assert f"rows 0..19 are in no shard (gap before {shard_files[1]})" in msg
  assert f"the image shards hold 50 rows but the labels file has {len(ids)}" in msg


def _upright_photo():
  """A smooth 64 x 96 (h x w) picture that no turn or mirror leaves unchanged: red rises to the
  right, green downwards, blue towards the bottom right."""
  y, x = np.mgrid[0:64, 0:96].astype(np.float32)
  return np.stack([40 + 2 * x, 30 + 3 * y, 20 + 200 * x * y / (95 * 63)], -1).astype(np.uint8)


# EXIF Orientation -> the stored pixels of an upright picture u (TIFF 6.0: where row 0 and
# column 0 of the stored image are on the displayed one).
STORED = {1: lambda u: u, 2: lambda u: u[:, ::-1], 3: lambda u: u[::-1, ::-1],
          4: lambda u: u[::-1], 5: lambda u: u.transpose(1, 0, 2),
          6: lambda u: np.rot90(u, 1), 7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),
          8: lambda u: np.rot90(u, -1)}


def test_max_side_turns_exif_oriented_photos_upright(tmp_path):
  """Each of the 8 EXIF orientations, stored losslessly (PNG) and as JPEG: re-encoded under
  max_side, the picture is the upright one shrunk (mean error < 2 levels after JPEG q95, more
  than 20 from every other turn), and the JPEG written has no orientation left to apply."""
  upright = _upright_photo()
  ref = np.asarray(Image.fromarray(upright).resize((48, 32), Image.Resampling.BOX), np.float32)
  others = [np.asarray(Image.fromarray(np.ascontiguousarray(f(upright))).resize(
      (48, 32) if f(upright).shape[0] == 64 else (32, 48), Image.Resampling.BOX), np.float32)
      for o, f in STORED.items() if o != 1]
  (tmp_path / "src").mkdir()
  paths = []
  for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 100, "subsampling": 0})):
    for o, stored in STORED.items():
      exif = Image.Exif()
      exif[0x0112] = o
      paths.append(str(tmp_path / "src" / f"{o}.{fmt.lower()}"))
      Image.fromarray(np.ascontiguousarray(stored(upright))).save(paths[-1], fmt, exif=exif, **kw)
  out = shards.pack(paths, str(tmp_path / "out"), max_side=32, progress=False)
  reader = shards.ShardReader(out)
  for i, p in enumerate(paths):
    with Image.open(io.BytesIO(reader.encoded(i))) as img:
      assert img.getexif().get(0x0112, 1) == 1, p
      got = np.asarray(img.convert("RGB"), np.float32)
    assert got.shape == ref.shape, p
    assert np.abs(got - ref).mean() < 2, p
    assert all(o.shape != got.shape or np.abs(got - o).mean() > 20 for o in others), p
    # As training reads them: the packed image and the file give the same pixels.
    packed = preprocessing.to_rgb_uint8(reader.encoded(i), 32, draft=False).astype(np.float32)
    assert np.abs(packed - preprocessing.to_rgb_uint8(p, 32, draft=False)).mean() < 2, p
