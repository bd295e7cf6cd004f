"""The demo's own outputs (the demo itself runs in the README's first command)."""

from __future__ import annotations

import numpy as np

from kspec_fluxcal.sim import accuracy_table


def test_accuracy_table_explains_its_columns():
    """Issue 16: the table's columns (cal_shape%, level_cal%...) were not explained."""
    row = {"expid": "KS20261101_0001", "n_standards": 2, "cal_shape": 0.004, "shape": 0.02,
           "shape_bright": 0.005, "level": 0.01, "level_cal": -0.003, "telluric": 0.002,
           "stars": [{"d_teff": 10.0, "d_logg": 0.02, "d_feh": 0.01, "d_rv": 0.5,
                      "d_ebv": 0.003}]}
    text = accuracy_table([row])
    header = text.splitlines()[0].split()
    assert header[0] == "EXPID"
    legend = {line.split(":", 1)[0].strip(): line for line in text.splitlines()
              if line.startswith("  ") and ":" in line}
    for column in header[1:]:
        assert column in legend, column
    assert "FCALNSTR" in legend["n_std"]
    assert "truth" in text.split("\n\n")[1].splitlines()[0]
    assert np.isfinite(float(text.splitlines()[1].split()[2]))
