"""Metadata encoders, shared by the synthetic generator, training and inference.

Formulas (radians; docs/data.md#the-files): SPATIAL = unit-sphere xyz of lat/lon; TEMPORAL =
[sin, cos](2 pi month / 12) or day of year [sin, cos](2 pi doy / 365.25), optionally followed by
[sin, cos](2 pi hour / 24); ELEVATION = per scale s, [sin, cos](2 pi e / s), interleaved.
"""

from __future__ import annotations

import numpy as np


def spatial(lat_deg, lon_deg) -> np.ndarray:
  lat, lon = np.radians(np.asarray(lat_deg, np.float64)), np.radians(np.asarray(lon_deg, np.float64))
  return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)],
                  axis=-1).astype(np.float32)


def temporal(month=None, hour=None, day_of_year=None) -> np.ndarray:
  """Month (1-12) or day of year (1-366) cycle, then the hour cycle if `hour` is given."""
  if (month is None) == (day_of_year is None):
    raise ValueError("give exactly one of month or day_of_year")
  phase = (2 * np.pi * np.asarray(month, np.float64) / 12 if month is not None
           else 2 * np.pi * np.asarray(day_of_year, np.float64) / 365.25)
  cols = [np.sin(phase), np.cos(phase)]
  if hour is not None:
    h = 2 * np.pi * np.asarray(hour, np.float64) / 24
    cols += [np.sin(h), np.cos(h)]
  return np.stack(cols, axis=-1).astype(np.float32)


def elevation(elev_m, scales) -> np.ndarray:
  e = np.asarray(elev_m, np.float64)
  cols = []
  for s in scales:
    cols += [np.sin(2 * np.pi * e / s), np.cos(2 * np.pi * e / s)]
  return np.stack(cols, axis=-1).astype(np.float32)


def elevation_column_names(scales) -> list[str]:
  return [f"elev_{s:g}_{fn}" for s in scales for fn in ("sin", "cos")]


def original_null_form(name: str, dim: int) -> np.ndarray:
  """What the original writes for a missing component: zeros, or [0, 1, ...] for ELEVATION."""
  if name.upper() == "ELEVATION":
    return np.tile(np.array([0.0, 1.0], np.float32), dim // 2)
  return np.zeros(dim, np.float32)
