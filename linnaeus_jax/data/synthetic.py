"""A learnable synthetic taxonomic dataset in the original's `labels.h5` schema.

The task needs both the image and the metadata:
- order, family and genus are visible: the order sets the background tint, the family the colour
  of the shape, the genus its form (disk, square, triangle, ...);
- sibling species of one genus look nearly identical (sizes 4 percent apart) but live in different
  regions (lat/lon), peak in different months and occupy different elevation bands, so only the
  metadata tells them apart.

Output (docs/data.md#the-files): `labels.h5` with `img_identifiers`, `taxa_L10/L20/L30/L40`
(uint32 raw taxon ids, 0 = null), `temporal`, `spatial`, `elevation_<set>` (with `column_names`,
`method` and `scales` attributes), `raw_lat`, `raw_lon`, `raw_elevation`, `raw_date_observed`,
`in_region` and a `/metadata` group; images as JPEG files in `images/` or as `images.h5`.

    python -m linnaeus_jax.data.synthetic --out=DIR [--species_per_genus=4 ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time

import h5py
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from linnaeus_jax import cli
from linnaeus_jax.data import encoders

SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond")
TASK_KEYS = ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")  # species, genus, family, order
ELEVATION_SOURCE = "elevation_broadrange_2"
# Sibling k of a genus lives around REGIONS[(k + genus) % 4] (lat, lon in degrees).
REGIONS = ((48.0, -105.0), (45.0, 15.0), (-22.0, -58.0), (-25.0, 135.0))
ELEVATION_BANDS_M = (150.0, 800.0, 1600.0, 2800.0)
HARDER = ("pixel_confusion", "metadata_spread", "label_noise_rate")


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
  """Generator options; equal options give byte-identical arrays and images."""
  num_orders: int = 2
  families_per_order: int = 2
  genera_per_family: int = 3
  species_per_genus: int = 4
  img_size: int = 64
  max_samples_per_species: int = 200
  min_samples_per_species: int = 40
  zipf_exponent: float = 0.5  # samples of the species of rank r: max * r**-exponent
  null_species_rate: float = 0.04  # rows whose species is unknown
  null_genus_rate: float = 0.02  # rows whose species and genus are unknown
  missing_temporal_rate: float = 0.05
  missing_spatial_rate: float = 0.05
  missing_elevation_rate: float = 0.05
  out_of_region_rate: float = 0.05
  temporal_hours: bool = False  # temporal width 4 (month + hour) instead of 2
  elevation_scales: tuple[float, ...] = (100.0, 500.0, 1000.0, 2000.0, 5000.0)
  image_format: str = "jpeg"  # 'jpeg' (a folder of files) or 'h5' (images.h5)
  seed: int = 0
  # Harder variants (0 / 1: the original task, the same bytes): the share of rows drawn with a
  # sibling genus's shape and a sibling family's colour (coarse ranks confusable from pixels); a
  # factor on the spread of location, season and elevation around each species' own (ranges
  # overlap); the share of rows whose labels are those of another random species (label noise).
  pixel_confusion: float = 0.0
  metadata_spread: float = 1.0
  label_noise_rate: float = 0.0

  def validate(self) -> None:
    problems = []
    for name in ("num_orders", "families_per_order", "genera_per_family", "species_per_genus",
                 "img_size", "max_samples_per_species", "min_samples_per_species"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.min_samples_per_species > self.max_samples_per_species:
      problems.append("min_samples_per_species exceeds max_samples_per_species")
    for name in ("null_species_rate", "null_genus_rate", "missing_temporal_rate",
                 "missing_spatial_rate", "missing_elevation_rate", "out_of_region_rate",
                 "pixel_confusion", "label_noise_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.null_species_rate + self.null_genus_rate >= 1.0:
      problems.append("null_species_rate + null_genus_rate must be < 1")
    if not self.metadata_spread > 0:
      problems.append(f"metadata_spread must be > 0, got {self.metadata_spread}")
    if self.img_size < 16:
      problems.append(f"img_size must be >= 16, got {self.img_size}")
    if self.image_format not in ("jpeg", "h5"):
      problems.append(f"image_format must be 'jpeg' or 'h5', got {self.image_format!r}")
    if not self.elevation_scales or min(self.elevation_scales) <= 0:
      problems.append("elevation_scales must be a non-empty list of positive numbers")
    if problems:
      raise ValueError("Invalid synthetic dataset options:\n  " + "\n  ".join(problems))

  def fingerprint(self) -> str:
    """Short hash naming the cache folder of these options (the harder variants' fields count
    only when set, so the original task keeps its folder)."""
    fields = dataclasses.asdict(self)
    for f in dataclasses.fields(self):
      if f.name in HARDER and fields[f.name] == f.default:
        del fields[f.name]
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  """Raw taxon ids per level; species s belongs to genus s // species_per_genus, and so on."""
  species: np.ndarray
  genus: np.ndarray
  family: np.ndarray
  order: np.ndarray
  species_genus: np.ndarray  # (S,) genus index of each species
  genus_family: np.ndarray  # (G,)
  family_order: np.ndarray  # (F,)


def make_taxonomy(opts: SyntheticOptions, rng: np.random.Generator) -> Taxonomy:
  n_o = opts.num_orders
  n_f = n_o * opts.families_per_order
  n_g = n_f * opts.genera_per_family
  n_s = n_g * opts.species_per_genus
  ids = rng.choice(np.arange(1, 2_000_000, dtype=np.int64), size=n_o + n_f + n_g + n_s,
                   replace=False).astype(np.uint32)
  order, family, genus, species = np.split(ids, np.cumsum([n_o, n_f, n_g]))
  return Taxonomy(species=species, genus=genus, family=family, order=order,
                  species_genus=np.arange(n_s) // opts.species_per_genus,
                  genus_family=np.arange(n_g) // opts.genera_per_family,
                  family_order=np.arange(n_f) // opts.families_per_order)


def taxa_json(tax: Taxonomy) -> str:
  """`taxa.json` as the dataset builder writes it ({task: {raw id: {"name"}}}): readable names
  (order 1, family 2, genus 3, "genus 3 sp. 2") that training shows in its tables and plots."""
  seen = np.zeros(len(tax.genus), int)
  species = {}
  for s, g in enumerate(tax.species_genus):
    seen[g] += 1
    species[str(int(tax.species[s]))] = {"name": f"genus {g + 1} sp. {seen[g]}"}
  out = {"taxa_L10": species}
  for task, ids, rank in (("taxa_L20", tax.genus, "genus"), ("taxa_L30", tax.family, "family"),
                          ("taxa_L40", tax.order, "order")):
    out[task] = {str(int(x)): {"name": f"{rank} {i + 1}"} for i, x in enumerate(ids)}
  return json.dumps(out, indent=1)


def _write_taxa(out_dir: str, opts: SyntheticOptions) -> None:
  """taxa.json beside labels.h5 (the taxonomy is the generator's first draw, so it is the same
  for a dataset generated before taxa.json existed)."""
  path = os.path.join(out_dir, "taxa.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(taxa_json(make_taxonomy(opts, np.random.default_rng(opts.seed))))
  os.replace(path + ".tmp", path)


def species_counts(opts: SyntheticOptions, n_species: int, rng: np.random.Generator) -> np.ndarray:
  """Zipf-like imbalance: the species of (random) rank r gets max * r**-exponent samples."""
  ranks = rng.permutation(n_species) + 1
  counts = np.round(opts.max_samples_per_species * ranks ** -opts.zipf_exponent)
  return np.maximum(counts, opts.min_samples_per_species).astype(np.int64)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  """HSV in [0, 1] -> RGB float array in [0, 255]."""
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb) * 255.0


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float):
  if shape == "square":
    k, offset = 4, np.pi / 4
  elif shape == "triangle":
    k, offset = 3, 0.0
  elif shape == "diamond":
    k, offset = 4, 0.0
  else:
    raise ValueError(shape)
  t = angle + offset + 2 * np.pi * np.arange(k) / k
  sx = 0.6 if shape == "diamond" else 1.0
  return [(cx + r * sx * np.cos(a), cy + r * np.sin(a)) for a in t]


def render(opts: SyntheticOptions, genus: int, family: int, order: int, sibling: int,
           rng: np.random.Generator) -> np.ndarray:
  """One uint8 HxWx3 image of a member of `genus` (sibling index only changes the size by 4%)."""
  size = opts.img_size
  bg = _hsv(order / opts.num_orders + 0.55, 0.35, 0.35 + 0.4 * (order % 2))
  img = Image.fromarray(np.clip(bg + rng.normal(0, 6, 3), 0, 255).astype(np.uint8)[None, None]
                        .repeat(size, 0).repeat(size, 1))
  draw = ImageDraw.Draw(img)
  n_fam = opts.num_orders * opts.families_per_order
  colour = _hsv(family / n_fam, 0.85, 0.95) * rng.uniform(0.85, 1.0)
  fill = tuple(int(c) for c in np.clip(colour, 0, 255))
  r = size * rng.uniform(0.2, 0.28) * (1.0 + 0.04 * (sibling - (opts.species_per_genus - 1) / 2))
  cx, cy = rng.uniform(r, size - r, 2)
  angle = rng.uniform(0, 2 * np.pi)
  shape = SHAPES[genus % len(SHAPES)]
  if shape == "disk":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "ring":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
  elif shape == "cross":
    w = r / 3
    c, s = np.cos(angle), np.sin(angle)
    for dx, dy in ((c, s), (-s, c)):
      draw.line([(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)], fill=fill,
                width=max(2, int(2 * w)))
  else:
    draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
  arr = np.asarray(img, dtype=np.float32)
  if (genus // len(SHAPES)) % 2 == 1:  # genera beyond the sixth get a striped texture
    stripes = (np.arange(size) // max(2, size // 16)) % 2 == 0
    arr[stripes] *= 0.8
  arr += rng.normal(0, 8, arr.shape)
  return np.clip(arr, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _Rows:
  """What each of the N rows is: its species and lineage, and its index among its siblings."""
  species: np.ndarray  # (N,) species index
  genus: np.ndarray  # (N,)
  family: np.ndarray  # (N,)
  order: np.ndarray  # (N,)
  sibling: np.ndarray  # (N,) index of the species within its genus


def _draw_rows(opts: SyntheticOptions, tax: Taxonomy, rng: np.random.Generator) -> _Rows:
  """The rows' species, with the Zipf-like imbalance of `species_counts`, in random order."""
  counts = species_counts(opts, len(tax.species), rng)
  sp = rng.permutation(np.repeat(np.arange(len(tax.species)), counts))
  g = tax.species_genus[sp]
  f = tax.genus_family[g]
  return _Rows(species=sp, genus=g, family=f, order=tax.family_order[f],
               sibling=sp % opts.species_per_genus)


def _draw_labels(opts: SyntheticOptions, tax: Taxonomy, rows: _Rows, rng: np.random.Generator,
                 hard: np.random.Generator) -> dict[str, np.ndarray]:
  """{task: (N,) uint32 raw taxon id}, with partial (null) species or species + genus, and the
  label noise of `label_noise_rate` (drawn from `hard`)."""
  n, n_species = len(rows.species), len(tax.species)
  u = rng.random(n)
  null_genus = u < opts.null_genus_rate
  null_species = null_genus | (u < opts.null_genus_rate + opts.null_species_rate)
  noisy = hard.random(n) < opts.label_noise_rate  # labelled as another species, lineage and all
  sp_lab = np.where(noisy, (rows.species + hard.integers(1, max(n_species, 2), n)) % n_species,
                    rows.species)
  g_lab = tax.species_genus[sp_lab]
  f_lab = tax.genus_family[g_lab]
  return {
      "taxa_L10": np.where(null_species, 0, tax.species[sp_lab]).astype(np.uint32),
      "taxa_L20": np.where(null_genus, 0, tax.genus[g_lab]).astype(np.uint32),
      "taxa_L30": tax.family[f_lab].astype(np.uint32),
      "taxa_L40": tax.order[tax.family_order[f_lab]].astype(np.uint32),
  }


def _image_taxa(opts: SyntheticOptions, rows: _Rows, hard: np.random.Generator):
  """(genus, family) each row is drawn as: confusable rows (`pixel_confusion`) look like a
  sibling genus (same family) in a sibling family's colour (same order), so that the shape and
  colour no longer pin the genus and family down."""
  n, g, f, o = len(rows.species), rows.genus, rows.family, rows.order
  confused = hard.random(n) < opts.pixel_confusion
  gpf, fpo = opts.genera_per_family, opts.families_per_order
  g_img = np.where(confused, f * gpf + (g + hard.integers(0, gpf, n)) % gpf, g)
  f_img = np.where(confused, o * fpo + (f + hard.integers(0, fpo, n)) % fpo, f)
  return g_img, f_img


def _draw_metadata(opts: SyntheticOptions, rows: _Rows, rng: np.random.Generator) -> dict:
  """Raw metadata per row: each sibling has its own region, season and elevation band (spread
  by `metadata_spread`); `miss_*` mark the rows whose value is missing."""
  n, g, sibling, k = len(rows.species), rows.genus, rows.sibling, opts.metadata_spread
  region = np.array(REGIONS)[(sibling + g) % len(REGIONS)]
  lat = np.clip(region[:, 0] + k * rng.normal(0, 6, n), -89, 89)
  lon = (region[:, 1] + k * rng.normal(0, 10, n) + 180) % 360 - 180
  month = ((3 * sibling + g + np.round(k * rng.normal(0, 1.0, n))) % 12 + 1).astype(np.int64)
  day = rng.integers(1, 29, n)
  hour = rng.integers(0, 24, n)
  elev = np.maximum(np.array(ELEVATION_BANDS_M)[(sibling + 2 * g) % len(ELEVATION_BANDS_M)]
                    + k * rng.normal(0, 120, n), 1.0)
  miss_t = rng.random(n) < opts.missing_temporal_rate
  miss_s = rng.random(n) < opts.missing_spatial_rate
  miss_e = rng.random(n) < opts.missing_elevation_rate
  in_region = (rng.random(n) >= opts.out_of_region_rate).astype(np.uint8)
  return dict(lat=lat, lon=lon, month=month, day=day, hour=hour, elev=elev, miss_t=miss_t,
              miss_s=miss_s, miss_e=miss_e, in_region=in_region)


def _encode_metadata(opts: SyntheticOptions, meta: dict) -> dict[str, np.ndarray]:
  """The encoded `temporal`, `spatial` and `elevation` columns (missing values in the
  original's null form) and the `dates` strings ('' where the date is missing)."""
  temporal = encoders.temporal(month=meta["month"],
                               hour=meta["hour"] if opts.temporal_hours else None)
  temporal[meta["miss_t"]] = 0.0
  spatial = encoders.spatial(meta["lat"], meta["lon"])
  spatial[meta["miss_s"]] = 0.0
  elevation = encoders.elevation(meta["elev"], opts.elevation_scales)
  elevation[meta["miss_e"]] = encoders.original_null_form("ELEVATION", elevation.shape[1])
  dates = np.array([f"2020-{m:02d}-{d:02d}T{h:02d}:00:00"
                    for m, d, h in zip(meta["month"], meta["day"], meta["hour"])], dtype=object)
  dates[meta["miss_t"]] = ""
  return dict(temporal=temporal, spatial=spatial, elevation=elevation, dates=dates)


def _write_labels(path: str, opts: SyntheticOptions, ids: np.ndarray, labels: dict, meta: dict,
                  enc: dict) -> None:
  """Writes the labels file (docs/data.md#the-files) at `path`."""
  miss_s, miss_e = meta["miss_s"], meta["miss_e"]
  with h5py.File(path, "w") as h5:
    h5.create_dataset("img_identifiers", data=ids, dtype=h5py.string_dtype())
    for key, col in labels.items():
      h5.create_dataset(key, data=col)
    t_cols = ["month_sin", "month_cos"] + (["hour_sin", "hour_cos"] if opts.temporal_hours else [])
    ds = h5.create_dataset("temporal", data=enc["temporal"])
    ds.attrs["column_names"] = t_cols
    ds.attrs["method"] = "sinusoidal"
    ds = h5.create_dataset("spatial", data=enc["spatial"])
    ds.attrs["column_names"] = ["spatial_x", "spatial_y", "spatial_z"]
    ds.attrs["method"] = "unit_sphere"
    ds = h5.create_dataset(ELEVATION_SOURCE, data=enc["elevation"])
    ds.attrs["column_names"] = encoders.elevation_column_names(opts.elevation_scales)
    ds.attrs["method"] = "sinusoidal"
    ds.attrs["scales"] = np.asarray(opts.elevation_scales, np.float32)
    h5.create_dataset("raw_lat", data=np.where(miss_s, np.nan, meta["lat"]).astype(np.float32))
    h5.create_dataset("raw_lon", data=np.where(miss_s, np.nan, meta["lon"]).astype(np.float32))
    h5.create_dataset("raw_elevation",
                      data=np.where(miss_e, np.nan, meta["elev"]).astype(np.float32))
    h5.create_dataset("raw_date_observed", data=enc["dates"], dtype=h5py.string_dtype())
    h5.create_dataset("in_region", data=meta["in_region"])
    h5.create_group("metadata").attrs["config_json"] = json.dumps(
        {"generator": "linnaeus_jax.data.synthetic", **dataclasses.asdict(opts)})


def _write_images(out_dir: str, opts: SyntheticOptions, ids: np.ndarray, rows: _Rows,
                  g_img: np.ndarray, f_img: np.ndarray, verbose: bool) -> dict[str, str]:
  """Renders every row's image into `images/` (JPEG files) or `images.h5`; its path as
  {"images_dir" or "images_path": path}. Each image is drawn from its own seed, so that files
  can be regenerated one by one."""
  t0, n, size = time.time(), len(ids), opts.img_size
  images_dir = os.path.join(out_dir, "images")
  images_path = os.path.join(out_dir, "images.h5")
  h5img = None
  if opts.image_format == "h5":
    h5img = h5py.File(images_path + ".tmp", "w")
    dset = h5img.create_dataset("images", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3))
  else:
    os.makedirs(images_dir, exist_ok=True)
  for i in range(n):
    img_rng = np.random.default_rng([opts.seed, i])
    img = render(opts, int(g_img[i]), int(f_img[i]), int(rows.order[i]), int(rows.sibling[i]),
                 img_rng)
    if h5img is not None:
      dset[i] = img
    else:
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="JPEG", quality=92)
      with open(os.path.join(images_dir, ids[i]), "wb") as fh:
        fh.write(buf.getvalue())
    if verbose and (i + 1) % 2000 == 0:
      print(f"  synthetic: {i + 1}/{n} images ({time.time() - t0:.1f}s)", file=sys.stderr)
  if h5img is None:
    return {"images_dir": images_dir}
  h5img.close()
  os.replace(images_path + ".tmp", images_path)
  return {"images_path": images_path}


def generate(out_dir: str, opts: SyntheticOptions = SyntheticOptions(), verbose: bool = True):
  """Writes the dataset into `out_dir` and returns its paths as a dict."""
  opts.validate()
  rng = np.random.default_rng(opts.seed)
  tax = make_taxonomy(opts, rng)
  rows = _draw_rows(opts, tax, rng)
  # The harder variants draw from their own generator: the original stream stays the same.
  hard = np.random.default_rng([opts.seed, 7])
  labels = _draw_labels(opts, tax, rows, rng, hard)
  g_img, f_img = _image_taxa(opts, rows, hard)
  meta = _draw_metadata(opts, rows, rng)

  os.makedirs(out_dir, exist_ok=True)
  n = len(rows.species)
  ids = np.array([f"{100000 + i}_0.jpg" for i in range(n)], dtype=object)
  labels_path = os.path.join(out_dir, "labels.h5")
  _write_labels(labels_path + ".tmp", opts, ids, labels, meta, _encode_metadata(opts, meta))
  images = _write_images(out_dir, opts, ids, rows, g_img, f_img, verbose)
  _write_taxa(out_dir, opts)
  os.replace(labels_path + ".tmp", labels_path)  # labels.h5 last: marks a complete dataset
  if verbose:
    print(f"synthetic dataset: {n} rows, {len(tax.species)} species -> {out_dir}",
          file=sys.stderr)
  return {"labels_path": labels_path, **images}


def default_cache_dir() -> str:
  """`$LINNAEUS_JAX_CACHE/synthetic`, by default `~/.cache/linnaeus_jax/synthetic`."""
  root = os.environ.get("LINNAEUS_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "linnaeus_jax"))
  return os.path.join(root, "synthetic")


def ensure(opts: SyntheticOptions, cache_dir: str | None = None) -> dict:
  """Generates the dataset for `opts` into the cache unless it is already there."""
  out = os.path.join(cache_dir or default_cache_dir(), opts.fingerprint())
  labels = os.path.join(out, "labels.h5")
  if not os.path.exists(labels):
    print(f"Generating the synthetic dataset into {out} (first use) ...", file=sys.stderr)
    return generate(out, opts)
  paths = {"labels_path": labels}
  if not os.path.exists(os.path.join(out, "taxa.json")):  # generated before taxa.json existed
    _write_taxa(out, opts)
  if opts.image_format == "h5":
    paths["images_path"] = os.path.join(out, "images.h5")
  else:
    paths["images_dir"] = os.path.join(out, "images")
  return paths


# One absl flag per SyntheticOptions field, by the type of its default (tuples: comma-separated).
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, tuple: flags.DEFINE_list}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--out and one flag per `SyntheticOptions` field, with its default."""
  flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values)
  for field in dataclasses.fields(SyntheticOptions):
    default = field.default
    if isinstance(default, tuple):
      default = [str(v) for v in default]
    _DEFINE[type(field.default)](field.name, default, f"SyntheticOptions.{field.name}.",
                                 flag_values=flag_values)
  flags.mark_flag_as_required("out", flag_values=flag_values)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> SyntheticOptions:
  """The validated options the flags give; ValueError lists every problem."""
  values = {}
  for field in dataclasses.fields(SyntheticOptions):
    value = flag_values[field.name].value
    if isinstance(field.default, tuple):
      try:
        value = tuple(float(v) for v in value)
      except ValueError:
        raise ValueError(f"--{field.name}: expected comma-separated numbers, got "
                         f"{','.join(value)!r}") from None
    values[field.name] = value
  opts = SyntheticOptions(**values)
  opts.validate()
  return opts


def main(argv) -> None:
  cli.start(argv)
  opts = cli.call(options_from_flags)
  cli.call(generate, flags.FLAGS.out, opts)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
