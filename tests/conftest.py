"""Shared fixtures: small RED files and catalogs built in memory, a compute-counting scheduler."""

from __future__ import annotations

import contextlib
import gzip
import signal
import sys
from pathlib import Path

import dask
import numpy as np
import pytest

from kspec_fluxcal.calibration import running_median
from kspec_fluxcal.config import Config
from kspec_fluxcal.exposure import red_hdulist
from kspec_fluxcal.sim import bosz_wavelength_grid, write_synthetic_grid
from kspec_fluxcal.templates import CACHE_ENV

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"

#: For stars made from the fitting grid itself: their spectral chi^2 is statistically right
#: (no template mismatch), so it counts at its pixels' dof; the default down-weights it for
#: real stars, whose mismatch with any grid is correlated across pixels.
SELF_MODEL = Config().replace(spectral_dof=0)
requires_shared = pytest.mark.skipif(not SHARED_REAL.is_dir(),
                                     reason="../shared/real (real spectra) is not present")



class FlatStar:
    """A test star source (for ``standard_source``): a spectrum flat in F_lambda on BOSZ's
    R = 10000 grid, every star at 6000 K, log g 4.3, solar; subclasses change ``spectra``."""

    label = "test:flat"
    resolving_power = None

    def __init__(self):
        self.wavelength = bosz_wavelength_grid(10000, 2500.0, 26000.0)

    def native_fwhm(self, wavelength):
        return np.full(np.shape(wavelength), 0.01)

    def sample(self, rng, n, ranges=None):
        return {"teff": np.full(n, 6000.0), "logg": np.full(n, 4.3), "feh": np.zeros(n),
                "alpha": np.zeros(n)}

    def spectra(self, params):
        return np.full((len(params["teff"]), self.wavelength.size), 1e6)

    def describe(self):
        return {"label": self.label}

@pytest.fixture(scope="session", autouse=True)
def template_cache(tmp_path_factory):
    """Template libraries cached in the session's temporary directory, never next to a
    user's grid or in their home; subprocesses and cluster workers inherit the variable."""
    path = tmp_path_factory.mktemp("template_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def small_grid(tmp_path_factory):
    """The small synthetic grid (``write_synthetic_grid(small=True)``), written once for every
    module that only reads it."""
    return write_synthetic_grid(tmp_path_factory.mktemp("small_grid"), small=True, workers=2)


@pytest.fixture(scope="session")
def command_inputs(small_grid, tmp_path_factory):
    """Inputs of commands run through the entry point: the small grid, its cube, a small
    simulated survey (4 exposures, one setup) and one exposure with its catalog."""
    from test_bad_input import build_base, write_catalog

    from kspec_fluxcal.grid.build import build_grid
    from kspec_fluxcal.sim import Setup, simulate_survey

    root = tmp_path_factory.mktemp("commands")
    cube = build_grid(small_grid, root / "grid.zarr", progress=False)
    base = build_base(root, bosz=small_grid, store=cube)
    survey = simulate_survey(root / "survey", exposures=4, nights=1, seed=5, grid=small_grid,
                             setups=[Setup("a", pixels=1024, fibers=8)])
    red = root / "red.fits"
    red.write_bytes(base.red[2])
    red_gz = root / "red.fits.gz"  # not plain: read by astropy
    red_gz.write_bytes(gzip.compress(base.red[2]))
    catalog = write_catalog(root / "catalog.csv", base.rows[2])
    return {"bosz": small_grid, "cube": cube, "survey": survey, "red": red,
            "red_gz": red_gz, "catalog": catalog}


#: The command line's entry point, as installed beside this Python.
ENTRY_POINT = Path(sys.executable).with_name("kspec-fluxcal")

#: Lines reported at the end of the run: statistics and progress of long tests.
_REPORT = []


@pytest.fixture(scope="session")
def report_line():
    """``report_line(text)``: show ``text`` in the run's summary, with ``-v`` or ``-s`` only
    (``pytest -q`` stays quiet)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _REPORT and (config.getoption("verbose") > 0 or config.getoption("capture") == "no"):
        terminalreporter.section("kspec-fluxcal test report")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _synchronous_dask():
    """Deterministic Dask in tests (one thread), as xarray's and flox's test suites do."""
    with dask.config.set(scheduler="synchronous"):
        yield


class _RaiseOnCompute:
    """A Dask scheduler that raises when called: proves a function stays lazy."""

    def __init__(self, max_computes=0):
        self.max_computes = max_computes
        self.total_computes = 0

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(f"Too many computes: {self.total_computes} > {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


@pytest.fixture
def raise_if_computes():
    """Context factory: ``with raise_if_computes(): ...`` fails on any Dask compute."""

    def factory(max_computes=0):
        return dask.config.set(scheduler=_RaiseOnCompute(max_computes))

    return factory


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (TimeoutError) instead of hanging when the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fibres_columns(nfib, types=None, objid=None, ra=None, dec=None):
    types = types or (["C", "C"] + ["P"] * (nfib - 4) + ["S", "S"])[:nfib]
    return {
        "NAME": np.array([f"fib{i:02d}" for i in range(nfib)]),
        "TYPE": np.array(types),
        "RA": np.asarray(ra if ra is not None else 150.0 + 0.01 * np.arange(nfib), dtype=float),
        "DEC": np.asarray(dec if dec is not None else 2.0 + 0.01 * np.arange(nfib), dtype=float),
        "OBJID": np.asarray(objid if objid is not None else 1000 + np.arange(nfib), dtype=np.int64),
    }


@pytest.fixture
def red_file(tmp_path):
    """Factory writing a small valid RED file; keyword arguments change parts of it.

    Returns the path. ``header`` updates the primary header, ``drop`` removes keywords,
    ``wavelength`` replaces WAVELA (None: write a linear WCS instead), ``fibres`` replaces
    columns, ``flux``/``variance`` replace the arrays.
    """
    counter = iter(range(10_000))

    def make(nfib=6, npix=200, *, name=None, header=None, drop=(), wavelength="default",
             wavelength_header=None, fibres=None, flux=None, variance=None, seed=0):
        rng = np.random.default_rng(seed)
        wave = np.linspace(4000.0, 8000.0, npix)
        if flux is None:
            flux = 1000.0 + 100.0 * rng.standard_normal((nfib, npix))
        if variance is None:
            variance = np.full((nfib, npix), 100.0)
        hdr = {"EXPTIME": 900.0, "MJD-OBS": 61000.25, "EXPID": "E0001", "AIRMASS": 1.2,
               "SPECFWHM": 8.0}
        if isinstance(wavelength, str) and wavelength == "default":
            wavelength = wave
        if wavelength is None:
            step = wave[1] - wave[0]
            hdr.update({"CRVAL1": wave[0], "CDELT1": step, "CRPIX1": 1.0, "CUNIT1": "Angstroms",
                        "CTYPE1": "Wavelength"})
        hdr.update(header or {})
        for key in drop:
            hdr.pop(key, None)
        cols = fibres_columns(nfib)
        cols.update(fibres or {})
        hdul = red_hdulist(flux, variance, cols, hdr, wavelength=wavelength,
                           wavelength_header=wavelength_header)
        path = tmp_path / (name or f"red{next(counter):03d}.fits")
        hdul.writeto(path)
        return path

    return make


CATALOG_HEADER = ("dstDegrees,objid,RA,Dec,plx,dplx,pmra,dpmra,pmdec,dpmdec,Gaia,dGaia,BP,dBP,RP,"
                  "dRP,Teff,AGaia,dupvar,Ag,rp1,r1,r10,g,dg,gchi,gcontrib,r,dr,rchi,rcontrib,i,di,"
                  "ichi,icontrib,z,dz,zchi,zcontrib,nstat,J,dJ,H,dH,K,dK").split(",")


def catalog_row(objid, ra, dec, **values):
    """One Refcat2 row as a dict with plausible defaults for a G dwarf."""
    row = dict.fromkeys(CATALOG_HEADER, "0")
    row.update({"objid": objid, "RA": ra, "Dec": dec, "Gaia": 15.0, "dGaia": 0.002,
                "BP": 15.35, "dBP": 0.005, "RP": 14.5, "dRP": 0.004, "Teff": 5900, "AGaia": 0.1,
                "Ag": 0.12, "g": 15.4, "dg": 0.01, "r": 15.0, "dr": 0.01, "i": 14.9, "di": 0.01,
                "z": 14.85, "dz": 0.01, "J": 14.0, "dJ": 0.03, "H": 13.7, "dH": 0.03,
                "K": 13.65, "dK": 0.04})
    row.update(values)
    return row


@pytest.fixture
def catalog_file(tmp_path):
    """Factory writing a Refcat2 CSV from row dicts (see :func:`catalog_row`)."""

    def make(rows, name="catalog.csv", header=CATALOG_HEADER):
        path = tmp_path / name
        lines = [",".join(header)]
        lines += [",".join(str(r.get(c, "")) for c in header) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def star_vector_error(stars, truth, s):
    """Star ``s``'s calibration vector against the simulated truth: the shape rms of
    Cal_star / (true Cal / aperture) after a 100 A running median over 4000-8400 A, and its
    median level - 1."""
    wave = stars["wavelength"].values
    fiber = int(stars["fiber"].values[s])
    true_cal = 1.0 / (truth["response"] * truth["aperture"][fiber])
    ratio = np.where(stars["cal_mask"].values[s], stars["cal"].values[s] / true_cal, np.nan)
    smooth = running_median(ratio, wave, 100.0)
    use = (wave > 4000) & (wave < 8400) & stars["cal_mask"].values[s]
    rel = smooth[use] / np.median(smooth[use]) - 1
    return float(np.sqrt(np.mean(rel**2))), float(np.median(smooth[use]) - 1)
