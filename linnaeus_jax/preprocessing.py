"""Image decoding and normalisation shared by training and inference
(docs/design.md#one-preprocessing-path-for-training-and-inference).

Host side: decode any image to RGB uint8 and squash it to S x S with area interpolation (PIL BOX,
the equivalent of the original's cv2 INTER_AREA when shrinking); no crop, no aspect preservation.
Encoded JPEGs at least twice S on both sides are first decoded at a reduced DCT scale (PIL's
`draft`: 1/2, 1/4 or 1/8, each side staying >= S): about 2x faster for 2048 x 1536 photos, about
one level of mean difference (benchmarks/jpeg_decode.py).
Device side: uint8 -> float32 in [0, 1], optionally standardised with a recorded mean/std.

Pixel values to 8 bits (`to_rgb_uint8`, the same for files, PIL images and arrays):
- 16-bit data (PIL modes I;16*, and I as Pillow opens 16-bit PNGs; uint16 and other integer
  arrays wider than 8 bits): round(v / 257) of v clipped to [0, 65535], so 65535 -> 255 and
  32768 -> 128. (16-bit RGB PNGs are reduced by Pillow's decoder to their high byte.)
- float data (mode F, float arrays): already on the 0-255 scale; rounded, clipped, NaN -> 0.
- grey (1, L, I, F, LA) is replicated to the 3 channels; palettes (P, PA) are expanded.
- alpha (RGBA, LA, PA, P with a transparent colour) is dropped, not composited: the stored
  colour is kept, as PIL's convert('RGB') and OpenCV's default imread do.

Orientation: an EXIF Orientation tag (2-8, phone photos) is applied once, here, so an image
reaches the model as it displays, in training, evaluation, predict, serve and the dataset
builder's re-encode alike (`upright`).
"""

from __future__ import annotations

import datetime as dt
import io

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from linnaeus_jax.data import encoders


# PIL modes whose values are not 8-bit: converted through numpy (`_uint8`), not PIL's convert,
# which clips them to 0-255 instead of scaling.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _uint8(a: np.ndarray) -> np.ndarray:
  """Pixel values -> uint8 (module docstring): 16-bit integers by round(v / 257), floats on the
  0-255 scale rounded and clipped."""
  if a.dtype == np.uint8:
    return a
  if a.dtype.kind == "b":
    return a.astype(np.uint8) * 255
  if a.dtype.kind in "iu":
    if a.dtype.itemsize == 1:  # int8
      return np.clip(a, 0, 255).astype(np.uint8)
    return np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
  if a.dtype.kind == "f":
    return np.rint(np.clip(np.nan_to_num(a, nan=0.0), 0, 255)).astype(np.uint8)
  raise ValueError(f"image array of dtype {a.dtype}: expected integers, floats or bools")


def _rgb_array(a: np.ndarray) -> np.ndarray:
  """HxW, HxWx1 (grey), HxWx2 (grey + alpha), HxWx3 (RGB) or HxWx4 (RGBA) array of any numeric
  dtype -> HxWx3 uint8 RGB; alpha dropped."""
  a = np.asarray(a)
  if a.ndim == 3 and a.shape[-1] in (1, 2):
    a = a[..., 0]
  elif a.ndim == 3 and a.shape[-1] == 4:
    a = a[..., :3]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
    raise ValueError(f"image array of shape {a.shape}: expected HxW or HxWxC with C in 1-4")
  a = _uint8(a)
  return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def _rgb_image(img: Image.Image) -> Image.Image:
  """Any PIL mode -> mode RGB, by the rules of the module docstring."""
  if img.mode == "RGB":
    return img
  if img.mode in _WIDE_MODES:
    return Image.fromarray(_rgb_array(np.asarray(img)))
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # straight to RGB, PIL warns for per-entry (bytes) transparency
  return img.convert("RGB")


def upright(img: Image.Image) -> Image.Image:
  """`img` turned as its EXIF Orientation tag says it displays (a new, loaded image), or `img`
  itself when the tag is absent or 1. Call after `draft`: a reduced DCT scale keeps the tag."""
  try:
    orientation = img.getexif().get(0x0112, 1)
  except Exception:  # pylint: disable=broad-except  (a corrupt EXIF block: shown as stored)
    return img
  if orientation not in range(2, 9):
    return img
  return ImageOps.exif_transpose(img)


def _draft(img: Image.Image, size: int) -> None:
  """Lets a JPEG at least twice `size` on both sides decode at a reduced DCT scale (1/2, 1/4 or
  1/8, the largest that keeps both sides >= size); the BOX resize then finishes the job. Must
  come before the image is loaded."""
  if img.format in ("JPEG", "MPO") and min(img.size) >= 2 * size:  # MPO: phone JPEGs
    img.draft("RGB", (size, size))


def to_rgb_uint8(img, size: int, draft: bool = True) -> np.ndarray:
  """PIL image (any mode), HWC array, encoded bytes or a path -> (size, size, 3) uint8 RGB,
  upright as its EXIF orientation says (`upright`).

  draft: encoded JPEGs (bytes, paths) at least 2 * size on both sides are decoded at a reduced
  scale first (`_draft`); False decodes them at full size. PIL images and arrays are unaffected.
  """
  if isinstance(img, (bytes, bytearray)):
    img = Image.open(io.BytesIO(img))
    if draft:
      _draft(img, size)
    img = upright(img)
  elif isinstance(img, str):
    with Image.open(img) as f:
      if draft:
        _draft(f, size)
      f.load()
      img = upright(f)
  elif isinstance(img, Image.Image):
    img = upright(img)
  elif isinstance(img, np.ndarray):
    img = _rgb_array(img)
    if img.shape[:2] == (size, size):
      return np.ascontiguousarray(img)
    img = Image.fromarray(img)
  img = _rgb_image(img)
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BOX)
  return np.asarray(img, dtype=np.uint8)


def normalize(image_BxHxWx3, mean=None, std=None):
  """uint8 -> float32 [0, 1] (the original's training input), then (x - mean) / std if given
  (per channel; `image_stats` of the config in training, the record's at inference)."""
  x = image_BxHxWx3.astype(jnp.float32) / 255.0
  if mean is not None:
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x


# ----------------------------------------------------------------------------- Recorded layout
# What a trained model expects, written to DIR/assets/preprocessing.json at training and copied
# into bundles; inference encodes request metadata from it with the training formulas.

IMAGE = {"resize": "squash, PIL BOX (area) filter; JPEGs at least twice the size decoded at a "
                   "reduced DCT scale first",
         "value_range": [0.0, 1.0], "mean": None, "std": None, "channels": "RGB"}


def image_stats(config) -> tuple:
  """(mean, std) of data.image_mean/std as tuples of floats, or (None, None) when they are ()
  (images stay in [0, 1]); what the train and eval steps normalise with and `record` writes."""
  mean, std = config.data.image_mean, config.data.image_std
  if not len(mean):
    return None, None
  return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def recorded_stats(record: dict) -> tuple:
  """(mean, std) tuples of a record's image entry, or (None, None) when absent or null (records
  from before they existed, original bundles): what inference normalises with."""
  image = record["image"]
  if image.get("mean") is None:
    return None, None
  return tuple(float(x) for x in image["mean"]), tuple(float(x) for x in image["std"])


def _names(ds) -> list[str]:
  return [x.decode() if isinstance(x, bytes) else str(x) for x in ds.attrs.get("column_names", [])]


def _source_columns(name: str, ds) -> tuple[str, list[str], list[float]]:
  """(encoder, column names, elevation scales) of one labels.h5 metadata dataset."""
  width = ds.shape[1] if ds.ndim > 1 else 1
  names = _names(ds)
  kind = name.upper()
  if kind == "SPATIAL":
    return "unit_sphere", names or ["spatial_x", "spatial_y", "spatial_z"][:width], []
  if kind == "TEMPORAL":
    default = ["month_sin", "month_cos", "hour_sin", "hour_cos"][:width]
    return "cyclic_date", names or default, []
  if kind == "ELEVATION":
    scales = [float(s) for s in ds.attrs.get("scales", [])]
    if not scales and names:  # elev_<scale>_sin, elev_<scale>_cos, ...
      scales = list(dict.fromkeys(float(n.split("_")[1]) for n in names))
    return "elevation", names or encoders.elevation_column_names(scales), scales
  return "unknown", names or [f"{name.lower()}_{i}" for i in range(width)], []


# A valid value per encoder, to list the columns it makes.
_EXAMPLE = {"unit_sphere": (0.0, 0.0), "cyclic_date": dt.datetime(2000, 1, 1), "elevation": 0.0}


def record(config) -> dict:
  """{"image": ..., "metadata": [component, ...]} for `config` and its labels file (the one
  file, or the training file in two-file mode); the image's "mean"/"std" are
  data.image_mean/std as lists, None when not set."""
  import h5py  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  comps = []
  h5_paths = config.data.h5
  with h5py.File(h5_paths.labels_path or h5_paths.train_labels_path, "r") as h5:
    for name, comp in config_lib.enabled_components(config):
      encoder, names, scales = _source_columns(name, h5[comp.source])
      columns = list(comp.columns) or names
      if encoder != "unknown" and not set(columns) <= set(_encoded_columns(
          {"encoder": encoder, "scales": scales}, _EXAMPLE[encoder])):
        encoder = "unknown"  # columns inference cannot compute: always missing there
      comps.append({"name": name, "idx": comp.idx, "dim": comp.dim, "source": comp.source,
                    "encoder": encoder, "columns": columns, "scales": scales})
  mean, std = image_stats(config)
  listed = lambda x: None if x is None else list(x)
  return {"image": {"size": config.data.img_size, **IMAGE, "mean": listed(mean),
                    "std": listed(std)}, "metadata": comps}


def _encoded_columns(comp: dict, value) -> dict:
  """{column name: value} of every column the component's encoder makes (data/encoders.py, the
  formulas the training files were written with)."""
  enc = comp["encoder"]
  if enc == "unit_sphere":
    return dict(zip(("spatial_x", "spatial_y", "spatial_z"), encoders.spatial(*value)))
  if enc == "cyclic_date":
    doy = value.timetuple().tm_yday
    m = encoders.temporal(month=value.month, hour=value.hour)
    d = encoders.temporal(day_of_year=doy)
    return {"month_sin": m[0], "month_cos": m[1], "hour_sin": m[2], "hour_cos": m[3],
            "doy_sin": d[0], "doy_cos": d[1], "day_of_year_sin": d[0], "day_of_year_cos": d[1]}
  return dict(zip(encoders.elevation_column_names(comp["scales"]),
                  encoders.elevation(value, comp["scales"])))


def _request_value(encoder: str, request: dict):
  """The component's raw value from a request, or (None, reason) when missing or invalid."""
  if encoder == "unit_sphere":
    lat, lon = request.get("lat"), request.get("lon")
    if lat is None or lon is None:
      return None, "lat/lon missing"
    try:
      lat, lon = float(lat), float(lon)
    except (TypeError, ValueError):
      return None, f"lat/lon not numbers: {lat!r}, {lon!r}"
    if not (np.isfinite(lat) and np.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
      return None, f"lat/lon out of range: {lat}, {lon}"
    return (lat, lon), None
  if encoder == "cyclic_date":
    value = request.get("datetime_utc")
    if value is None or value == "":
      return None, "datetime_utc missing"
    if isinstance(value, str):
      try:
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
      except ValueError:
        return None, f"datetime_utc not ISO 8601: {value!r}"
    if not isinstance(value, dt.datetime):
      return None, f"datetime_utc not a datetime or ISO string: {value!r}"
    if value.tzinfo is not None:
      value = value.astimezone(dt.timezone.utc)
    return value, None
  if encoder == "elevation":
    value = request.get("elevation_m")
    if value is None:
      return None, "elevation_m missing"
    try:
      value = float(value)
    except (TypeError, ValueError):
      return None, f"elevation_m not a number: {value!r}"
    if not np.isfinite(value):
      return None, f"elevation_m not finite: {value}"
    return value, None
  return None, "no encoder for this component at inference"


def encode_metadata(layout: list[dict], request: dict | None):
  """One request's metadata -> ({name: (dim,) float32}, valid (C,) bool, warnings).

  A missing or invalid value makes its component invalid (zeros, valid False) with a warning;
  a real 0 (equator, sea level) is valid.
  """
  request = request or {}
  meta, valid, warnings = {}, [], []
  for comp in layout:
    value, why = _request_value(comp["encoder"], request)
    if why is None:
      cols = _encoded_columns(comp, value)
      meta[comp["name"]] = np.array([cols[c] for c in comp["columns"]], np.float32)
    else:
      meta[comp["name"]] = np.zeros(comp["dim"], np.float32)
      warnings.append(f"{comp['name']} invalid: {why}")
    valid.append(why is None)
  return meta, np.array(valid, bool), warnings
