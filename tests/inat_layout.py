"""A small dataset in the iNaturalist 2021 layout, as a user downloads it: `train.json`,
`val.json` and photos in nested `train/<category dir>/` and `val/<category dir>/` folders.

Photos are JPEGs whose colour pattern depends on the species, taken where and when the species
lives; a few are the awkward files real data has: truncated, zero-byte, CMYK, greyscale, a PNG
named .jpg, and one photo stored sideways with each of the 8 EXIF orientations (as phones write
them). `python tests/inat_layout.py OUT` writes one for walking the journey by hand.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

SPECIES = [  # (genus, epithet, family, order, lat, lon, month)
    ("Quercus", "alba", "Fagaceae", "Fagales", 40.0, -80.0, 5),
    ("Quercus", "rubra", "Fagaceae", "Fagales", 45.0, -70.0, 9),
    ("Fagus", "grandifolia", "Fagaceae", "Fagales", 35.0, -85.0, 6),
    ("Betula", "papyrifera", "Betulaceae", "Fagales", 55.0, -100.0, 7),
    ("Lumbricus", "terrestris", "Lumbricidae", "Haplotaxida", 50.0, 10.0, 4),
    ("Lumbricus", "rubellus", "Lumbricidae", "Haplotaxida", 48.0, 2.0, 10),
]
# Undecodable files: what the builder's decode check must drop, by file name.
UNDECODABLE = ("truncated.jpg", "empty.jpg")
EXIF_ORIENTATIONS = range(1, 9)


def categories() -> list[dict]:
  out = []
  for i, (genus, epithet, family, order, *_) in enumerate(SPECIES):
    kingdom, phylum, klass = (("Plantae", "Tracheophyta", "Magnoliopsida") if order == "Fagales"
                              else ("Animalia", "Annelida", "Clitellata"))
    out.append({"id": i, "name": f"{genus} {epithet}", "common_name": f"{genus} {epithet}",
                "supercategory": kingdom, "kingdom": kingdom, "phylum": phylum, "class": klass,
                "order": order, "family": family, "genus": genus, "specific_epithet": epithet,
                "image_dir_name": f"{i:05d}_{kingdom}_{phylum}_{klass}_{order}_{family}_"
                                  f"{genus}_{epithet}"})
  return out


def photo(species: int, rng: np.random.Generator, size=(64, 48)) -> np.ndarray:
  """An HxWx3 uint8 picture: a species colour darkening downwards, a stripe whose position is
  the species', a little noise."""
  w, h = size
  base = np.array([(37 * species) % 256, (91 * species + 60) % 256, (151 * species + 30) % 256])
  ramp = np.linspace(-40, 40, h)[:, None, None]  # top to bottom: tells the turns apart
  img = np.clip(base + ramp + rng.normal(0, 6, (h, w, 3)), 0, 255)
  x = (species * w) // len(SPECIES)
  img[:, x:x + w // len(SPECIES)] = 255 - base
  return img.astype(np.uint8)


def sideways(rgb: np.ndarray, orientation: int) -> Image.Image:
  """The image a camera stores for upright `rgb` with EXIF `orientation` (so that applying the
  tag gives `rgb` back): the inverse of ImageOps.exif_transpose's turn."""
  inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}[orientation]
  img = Image.fromarray(rgb)
  stored = img if inverse is None else img.transpose(inverse)
  exif = Image.Exif()
  exif[0x0112] = orientation
  stored.info["exif"] = exif.tobytes()
  return stored


def _save(img: Image.Image, path: str, fmt: str = "JPEG", exif: bytes | None = None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  kw = {"quality": 95} if fmt == "JPEG" else {}
  if exif:
    kw["exif"] = exif
  img.save(path, format=fmt, **kw)


def make(root: str, n_train: int = 120, n_val: int = 30, seed: int = 0) -> dict:
  """Writes the dataset under `root`; returns {"train": [...], "val": [...]} of the image
  entries, {"undecodable": [file_name, ...], "exif": {orientation: file_name}} and the paths of
  the upright twin PNGs of the EXIF photos ({orientation: path}, outside the dataset)."""
  rng = np.random.default_rng(seed)
  cats = categories()
  out = {"undecodable": [], "exif": {}, "upright": {}}
  ident = 1000
  for split, n in (("train", n_train), ("val", n_val)):
    images, annotations = [], []
    for k in range(n):
      s = k % len(SPECIES)
      genus, epithet, _, _, lat, lon, month = SPECIES[s]
      ident += 1
      name = f"{split}/{cats[s]['image_dir_name']}/{ident}.jpg"
      path = os.path.join(root, name)
      rgb = photo(s, rng)
      special = k if split == "train" else -1
      if special == 0:  # the last bytes missing
        _save(Image.fromarray(rgb), path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
        name = name.replace(f"{ident}.jpg", "truncated.jpg")
        os.replace(path, os.path.join(root, name))
        out["undecodable"].append(name)
      elif special == 1:
        name = name.replace(f"{ident}.jpg", "empty.jpg")
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        open(os.path.join(root, name), "wb").close()
        out["undecodable"].append(name)
      elif special == 2:
        _save(Image.fromarray(rgb).convert("CMYK"), path)
      elif special == 3:
        _save(Image.fromarray(rgb).convert("L"), path)
      elif special == 4:
        _save(Image.fromarray(rgb), path, fmt="PNG")  # a PNG named .jpg
      elif 5 <= special < 5 + len(EXIF_ORIENTATIONS):
        o = special - 4
        img = sideways(rgb, o)
        _save(img, path, exif=img.info["exif"])
        out["exif"][o] = name
        twin = os.path.join(root, "upright", f"{o}.png")
        _save(Image.fromarray(rgb), twin, fmt="PNG")
        out["upright"][o] = twin
      else:
        _save(Image.fromarray(rgb), path)
      day = 1 + int(rng.integers(0, 28))
      images.append({"id": ident, "width": rgb.shape[1], "height": rgb.shape[0],
                     "file_name": name, "license": 0, "rights_holder": "test",
                     "date": f"2020-{month:02d}-{day:02d} {int(rng.integers(6, 20)):02d}:00:00",
                     "latitude": lat + float(rng.normal(0, 1)),
                     "longitude": lon + float(rng.normal(0, 1)), "location_uncertainty": 10})
      annotations.append({"id": ident, "image_id": ident, "category_id": s})
    with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
      json.dump({"info": {"year": 2021}, "images": images, "categories": cats,
                 "annotations": annotations, "licenses": []}, f)
    out[split] = images
  return out


if __name__ == "__main__":
  made = make(sys.argv[1])
  print(f"{len(made['train'])} train / {len(made['val'])} val images in {sys.argv[1]}; "
        f"undecodable: {made['undecodable']}")
