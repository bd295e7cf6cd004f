"""Regenerate colour_teff_ck04.csv: AB colours of Castelli & Kurucz (2004) dwarf models.

Run from the repository root with the shared real-spectra folder beside it:

    python kspec_fluxcal/data/make_colour_teff.py ../shared/real/ck04

CK04 fluxes are surface fluxes on vacuum wavelengths; log g = 4.5 (column g45), [M/H] = 0.
"""

import sys
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits

from kspec_fluxcal.photometry import synthetic_mag


def main(ck04_dir):
    rows = []
    for path in sorted(Path(ck04_dir, "ckp00").glob("ckp00_*.fits")):
        with fits.open(path) as hdul:
            teff = float(hdul[0].header["TEFF"])
            data = hdul[1].data
            flux = xr.DataArray(np.asarray(data["g45"], dtype=np.float64), dims="wavelength",
                                coords={"wavelength": np.asarray(data["WAVELENGTH"],
                                                                 dtype=np.float64)})
        mags = synthetic_mag(flux, ["gaiadr2-BP", "gaiadr2-RP", "panstarrs-g", "panstarrs-r"],
                             medium="vacuum").values
        rows.append((teff, mags[0] - mags[1], mags[2] - mags[3]))
    out = Path(__file__).with_name("colour_teff_ck04.csv")
    with open(out, "w") as fh:
        fh.write("# AB colours of Castelli & Kurucz 2004 models, log g 4.5, [M/H] 0; "
                 "made by make_colour_teff.py\n")
        fh.write("teff,bp_rp,g_r\n")
        for teff, bprp, gr in sorted(rows):
            fh.write(f"{teff:.0f},{bprp:.4f},{gr:.4f}\n")
    print(f"wrote {out} ({len(rows)} models)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/real/ck04")
