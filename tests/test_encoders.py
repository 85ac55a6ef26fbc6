import numpy as np
import pytest

from linnaeus_jax.data import encoders


def test_closed_forms():
  np.testing.assert_allclose(encoders.spatial([0, 90, 0], [0, 0, 90]),
                             [[1, 0, 0], [0, 0, 1], [0, 1, 0]], atol=1e-7)
  np.testing.assert_allclose(encoders.temporal(month=[3, 12]), [[1, 0], [0, 1]], atol=1e-7)
  np.testing.assert_allclose(encoders.temporal(month=[6], hour=[6]), [[0, -1, 1, 0]], atol=1e-7)
  doy = encoders.temporal(day_of_year=[365.25 / 4])
  np.testing.assert_allclose(doy, [[1, 0]], atol=1e-7)
  np.testing.assert_allclose(encoders.elevation([250], [1000, 500]), [[1, 0, 0, -1]], atol=1e-7)
  assert encoders.elevation_column_names([100, 2.5]) == ["elev_100_sin", "elev_100_cos",
                                                         "elev_2.5_sin", "elev_2.5_cos"]
  with pytest.raises(ValueError):
    encoders.temporal()


def test_original_null_forms():
  np.testing.assert_array_equal(encoders.original_null_form("ELEVATION", 4), [0, 1, 0, 1])
  np.testing.assert_array_equal(encoders.original_null_form("spatial", 3), [0, 0, 0])
  # An elevation of exactly 0 m encodes to the original's null form: why validity is explicit.
  np.testing.assert_allclose(encoders.elevation([0.0], [100, 1000]),
                             [encoders.original_null_form("ELEVATION", 4)], atol=1e-7)
