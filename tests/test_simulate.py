"""The demo survey simulator: formats, truth, variety and determinism."""

import json
import time

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from scipy.interpolate import CubicSpline
from scipy.ndimage import median_filter

from kspec_fluxcal.catalog import match_standards, read_catalog
from kspec_fluxcal.constants import BANDS, FLUX_UNIT_SCALE, SPEED_OF_LIGHT_KMS
from kspec_fluxcal.errors import FluxCalError, OutputExistsError
from kspec_fluxcal.exposure import exposure_setup, open_exposure
from kspec_fluxcal.grid.build import read_bosz_spectrum, scan_bosz
from kspec_fluxcal.masks import load_regions, region_mask
from kspec_fluxcal.photometry import synthetic_mag
from kspec_fluxcal.reddening import extinction_per_ebv
from kspec_fluxcal.sim import (
    CATALOG_HEADER,
    DEFAULT_SETUP,
    ISOPLANE_SETUP,
    GridStars,
    Setup,
    doppler_shift,
    simulate_exposure,
    simulate_survey,
    telluric_transmission,
)

# The Refcat2 columns, in the order of formats contract section 2.
CONTRACT_COLUMNS = (
    "dstDegrees,objid,RA,Dec,plx,dplx,pmra,dpmra,pmdec,dpmdec,Gaia,dGaia,BP,dBP,RP,dRP,Teff,"
    "AGaia,dupvar,Ag,rp1,r1,r10,g,dg,gchi,gcontrib,r,dr,rchi,rcontrib,i,di,ichi,icontrib,z,dz,"
    "zchi,zcontrib,nstat,J,dJ,H,dH,K,dK").split(",")
SNR_RANGE = (30.0, 150.0)


@pytest.fixture(scope="module")
def grid_dir(small_grid):
    return small_grid


@pytest.fixture(scope="module")
def stars(grid_dir):
    return GridStars(grid_dir)


@pytest.fixture(scope="module")
def survey(grid_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("survey") / "demo"
    simulate_survey(out, exposures=4, nights=2, seed=11, pixels=1024, grid=grid_dir,
                    snr_range=SNR_RANGE)
    manifest = json.loads((out / "survey.json").read_text())
    truths = [dict(np.load(out / e["truth"])) for e in manifest["exposures"]]
    return out, manifest, truths


def _exposures(survey):
    out, manifest, truths = survey
    for entry, truth in zip(manifest["exposures"], truths, strict=True):
        yield out / entry["path"], entry, truth


# ----------------------------------------------------------------------------- truth


def test_oracle_identity_is_exact(survey):
    for _, _, t in _exposures(survey):
        expected = t["true_flux"] * t["response"] * t["aperture"][:, None]
        np.testing.assert_array_equal(t["counts_noiseless"], expected)
        kinds = t["fiber_kind"]
        assert np.all(t["true_flux"][kinds == "sky"] == 0)
        assert np.all(np.isnan(t["true_flux"][kinds == "dead"]))
        live = (kinds != "sky") & (kinds != "dead")
        assert np.all(t["true_flux"][live] > 0)
        assert np.all((t["aperture"] >= 0.85) & (t["aperture"] <= 0.95))
        # response = throughput x atmosphere x telluric x (exposure, area, pixel, photon) terms
        ratio = t["response"] / (t["throughput"] * t["atmosphere"] * t["telluric"])
        smooth = ratio / (t["wavelength"] * np.gradient(t["wavelength"]))
        assert np.ptp(smooth) / smooth.mean() < 1e-9


def test_noise_matches_the_variance_away_from_sky_lines(survey):
    """Unresampled files: (counts - noiseless) / sqrt(variance) is unit normal, except near
    bright sky lines, where the sky-subtraction residuals (not in the variance) are."""
    near_lines, far = [], []
    sky_lines = np.array([5577.34, 5889.95, 5895.92, 6300.30, 6363.78, 6863.96, 7276.41,
                          7316.28, 7340.89, 7750.64, 7794.11, 7821.50, 7913.71, 7993.33,
                          8344.60, 8399.17, 8430.17])
    for path, entry, t in _exposures(survey):
        if entry["wavelength_format"] == "wavela2d":
            continue
        with fits.open(path) as hdul:
            counts, var = hdul[0].data.astype(float), hdul["VARIANCE"].data.astype(float)
        z = (counts - t["counts_noiseless"]) / np.sqrt(var)
        fwhm = 2.3 * np.gradient(t["wavelength"])
        close = (np.abs(t["wavelength"][:, None] - sky_lines[None, :])
                 < 1.5 * fwhm[:, None]).any(axis=1)
        live = t["fiber_kind"] != "dead"
        far.append(z[live][:, ~close].ravel())
        near_lines.append(z[live][:, close].ravel())
    far, near_lines = np.concatenate(far), np.concatenate(near_lines)
    far, near_lines = far[np.isfinite(far)], near_lines[np.isfinite(near_lines)]
    assert abs(far.mean()) < 0.03
    assert far.std() == pytest.approx(1.0, abs=0.05)
    assert near_lines.std() > 1.25 * far.std()
    assert np.sum(np.abs(near_lines) > 4) >= 5  # outliers for a robust metric to shrug off


def test_noisy_counts_calibrate_to_the_truth(tmp_path, stars):
    """A perfect calibration (the true response on each fiber's own pixels) of the noisy
    counts, as the reader returns them (2-D WAVELA: each fiber on its own pixels), recovers
    the truth: the ratio (counts / response / aperture) / true_flux of each standard, running
    median over 100 A, is within 0.5% of 1 over 4000-8400 A (the bluest 500 A have too few
    counts to measure 0.5%)."""
    sim = simulate_exposure(3, stars, setup=DEFAULT_SETUP, n_standards=3,
                            wavelength_format="wavela2d", snr_range=(250, 400))
    path = tmp_path / "red.fits"
    sim.hdulist.writeto(path)
    ds = open_exposure(path)
    t = sim.truth
    assert ds.attrs["wavelength_layout"] == "per-fiber"
    np.testing.assert_allclose(ds["fiber_wavelength"].values, t["fiber_wavelength"], rtol=1e-12)
    window = int(round(100.0 / DEFAULT_SETUP.dispersion))
    inside = (t["wavelength"] > 4000.0) & (t["wavelength"] < 8400.0)
    for f in t["std_fiber"]:
        calibrated = ds["flux"].values[f] / (t["response_fiber"][f] * t["aperture"][f])
        ratio = calibrated / t["true_flux_fiber"][f]
        good = np.isfinite(ratio)
        running = median_filter(ratio[good], size=window, mode="nearest")
        assert np.max(np.abs(running[inside[good]] - 1.0)) < 0.005


def test_catalog_photometry_is_the_truth_plus_noise(survey, stars):
    out, _, _ = survey
    catalog = read_catalog(out / "catalog.csv")
    band_index = [BANDS.index(b) for b in catalog["band"].values]
    for _, _, t in _exposures(survey):
        for k, objid in enumerate(t["std_objid"]):
            row = catalog.sel(objid=objid)
            truth = t["std_mag"][k, band_index]
            measured, err = row["mag"].values, row["mag_err"].values
            ok = np.isfinite(measured)
            assert ok.sum() >= 5
            # 3-decimal rounding adds up to 0.0005 mag
            assert np.all(np.abs(measured[ok] - truth[ok]) < 5 * err[ok] + 0.001)
            # The stored truth is the photometry of the star rebuilt from the grid: the
            # interpolated surface flux, shifted (cubic spline in ln lambda, no 1+z factor),
            # reddened (F99) and diluted.
            wave = stars.wavelength
            surface = stars.spectrum(t["std_teff"][k], t["std_logg"][k], t["std_feh"][k],
                                     t["std_alpha"][k])
            ln_w = np.log(wave)
            shifted = CubicSpline(ln_w, surface)(ln_w - np.log1p(t["std_rv"][k]
                                                                / SPEED_OF_LIGHT_KMS))
            flux = shifted * 10 ** (-0.4 * t["std_ebv"][k] * extinction_per_ebv(wave))
            flux *= t["std_dilution"][k]
            rebuilt = synthetic_mag(xr.DataArray(flux, dims="wavelength",
                                                 coords={"wavelength": wave}), list(BANDS))
            np.testing.assert_allclose(rebuilt.values, t["std_mag"][k], atol=2e-4)
            # ... and of the convolved truth on the pixels, for the bands they cover.
            covered = ["panstarrs-g", "panstarrs-r", "panstarrs-i"]
            f = t["std_fiber"][k]
            on_pixels = synthetic_mag(xr.DataArray(t["true_flux"][f] * FLUX_UNIT_SCALE,
                                                   dims="wavelength",
                                                   coords={"wavelength": t["wavelength"]}),
                                      covered)
            expected = t["std_mag"][k, [BANDS.index(b) for b in covered]]
            np.testing.assert_allclose(on_pixels.values, expected, atol=1e-3)


def test_catalog_layout_sentinels_and_biased_extinction(survey):
    out, _, truths = survey
    lines = (out / "catalog.csv").read_text().splitlines()
    assert lines[0].split(",") == CONTRACT_COLUMNS == list(CATALOG_HEADER)
    rows = [dict(zip(CONTRACT_COLUMNS, line.split(","), strict=True)) for line in lines[1:]]
    std_ids = {str(i) for t in truths for i in t["std_objid"]}
    std_rows = [r for r in rows if r["objid"] in std_ids]
    assert len(std_rows) == len(std_ids)
    assert len(rows) > len(std_ids) + 4  # other stars and decoys
    assert any(r["J"] == "99.999" and r["dJ"] == "9.999" for r in std_rows)  # no 2MASS
    assert any(r[b] == "99.999" for r in std_rows for b in ("g", "r", "i", "z"))
    assert any(v == "" for r in rows for v in r.values())
    assert any(r["Teff"] == "0" for r in rows)
    # read_catalog turns the sentinels and the empty field into NaN
    catalog = read_catalog(out / "catalog.csv")
    no_2mass = [int(r["objid"]) for r in std_rows if r["J"] == "99.999"]
    assert np.all(np.isnan(catalog.sel(objid=no_2mass[0])["mag"].sel(
        band=["twomass-J", "twomass-H", "twomass-Ks"]).values))
    # The dust-map-like extinctions are 1.3x the truth (plus noise): biased high.
    ebv = {str(i): e for t in truths for i, e in zip(t["std_objid"], t["std_ebv"], strict=True)}
    a_g = np.array([float(r["AGaia"]) for r in std_rows])
    a_true = np.array([2.740 * ebv[r["objid"]] for r in std_rows])
    assert np.sum(a_g) / np.sum(a_true) == pytest.approx(1.3, abs=0.15)


# ----------------------------------------------------------------------------- RED files


def test_red_files_open_with_the_declared_variety(survey):
    out, _, _ = survey
    catalog = read_catalog(out / "catalog.csv")
    seen = set()
    for path, _, t in _exposures(survey):
        ds = open_exposure(path)
        np.testing.assert_allclose(ds["wavelength"].values, t["wavelength"], rtol=0, atol=1e-6)
        assert exposure_setup(ds) == str(t["setup_key"])
        assert ds.attrs["expid"] == str(t["expid"]) == path.stem
        assert path.parent.name == str(t["night"])
        assert ds.attrs["exptime"] == t["exptime"] and ds.attrs["airmass"] == t["airmass"]
        assert ds.attrs["mjd"] == pytest.approx(float(t["mjd"]))
        assert ds.attrs["lsf_source"] == "FWHMPC" and len(ds.attrs["lsf_fwhm_coeffs"]) == 3
        fwhm_pixels = (np.polynomial.polynomial.polyval(t["wavelength"] / 1e4,
                                                        ds.attrs["lsf_fwhm_coeffs"])
                       / np.gradient(t["wavelength"]))
        assert 2.0 <= fwhm_pixels.min() and fwhm_pixels.max() <= 2.5
        with fits.open(path) as hdul:
            header = hdul[0].header
            if "WAVELA" in hdul:
                wave_hdu = hdul["WAVELA"]
                if wave_hdu.header["BUNIT"] == "nm":
                    seen.add("nm")
                if wave_hdu.data.ndim == 2:
                    seen.add("2d")
                    assert ds.attrs["wavelength_layout"] == "per-fiber"
            else:
                assert header["CTYPE1"] == "Wavelength" and header["CUNIT1"] == "Angstroms"
                assert ds["wavelength"].attrs["source"] == "primary header WCS"
                seen.add("wcs")
        if ds.attrs["medium_in"] == "vac":
            seen.add("vac")
            assert any("vacuum" in h for h in ds.attrs["history"])
        types = ds["fiber_type"].values
        np.testing.assert_array_equal(types == "C", t["fiber_kind"] == "standard")
        dead = types == "D"
        if dead.any():
            seen.add("dead")
            assert np.all(np.isnan(ds["flux"].values[dead]))
        # a few masked cosmic rays in every live fiber
        assert np.all((~ds["good"].values[~dead]).sum(axis=1) >= 1)
        matched = match_standards(ds, catalog)
        assert np.all(matched["match"].values != "none")
        np.testing.assert_array_equal(matched["fiber"].values, t["std_fiber"])
        np.testing.assert_array_equal(matched["objid"].values, t["std_objid"])
        by_position = matched["match"].values == "position"
        if by_position.any():
            seen.add("objid-1")
            assert np.all(matched["separation"].values[by_position] < 0.5)
    assert seen == {"nm", "2d", "wcs", "vac", "dead", "objid-1"}


def test_survey_has_one_two_and_three_standards_in_snr_range(survey):
    _, manifest, truths = survey
    assert {e["n_standards"] for e in manifest["exposures"]} == {1, 2, 3}
    for entry, t in zip(manifest["exposures"], truths, strict=True):
        assert len(t["std_fiber"]) == entry["n_standards"]
        assert np.all((t["std_snr"] >= SNR_RANGE[0]) & (t["std_snr"] <= SNR_RANGE[1]))
        assert np.all((t["std_gmag"] >= 13.5) & (t["std_gmag"] <= 16.5))
    # Each night's exposures are in time order, at least 20 minutes apart.
    for night in {e["night"] for e in manifest["exposures"]}:
        mjd = [e["mjd"] for e in manifest["exposures"] if e["night"] == night]
        assert np.all(np.diff(mjd) * 1440 >= 20)


def test_standards_are_off_grid_dwarfs(survey, stars):
    for _, _, t in _exposures(survey):
        for name, lo, hi in (("teff", 5500, 7000), ("logg", 3.8, 4.6), ("feh", -0.9, 0.2)):
            values = t[f"std_{name}"]
            axis = stars.axes[name]
            assert np.all((values >= max(lo, axis[0])) & (values <= min(hi, axis[-1])))
            assert np.min(np.abs(values[:, None] - axis[None, :])) > 1e-3
        assert np.all(np.abs(t["std_rv"]) <= 200)
        assert np.all((t["std_ebv"] >= 0.01) & (t["std_ebv"] <= 0.12))


# ----------------------------------------------------------------------------- determinism


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, grid_dir):
    kwargs = {"exposures": 3, "nights": 1, "pixels": 512, "grid": grid_dir}
    a = _tree(simulate_survey(tmp_path / "a", seed=5, **kwargs))
    time.sleep(2.1)  # zip time stamps have a 2 s resolution: nothing may depend on the clock
    b = _tree(simulate_survey(tmp_path / "b", seed=5, **kwargs))
    c = _tree(simulate_survey(tmp_path / "c", seed=6, **kwargs))
    assert a.keys() == b.keys() and len(a) == 3 + 3 + 2
    assert a == b
    fits_files = [k for k in a if k.endswith(".fits")]
    assert all(a[k] != c.get(k) for k in fits_files) and a["catalog.csv"] != c["catalog.csv"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, grid_dir):
    out = tmp_path / "s"
    out.mkdir()  # an empty directory may be used
    simulate_survey(out, exposures=1, pixels=256, grid=grid_dir)
    before = _tree(out)
    with pytest.raises(OutputExistsError):
        simulate_survey(out, exposures=1, pixels=256, grid=grid_dir, seed=1)
    assert _tree(out) == before  # untouched
    simulate_survey(out, exposures=2, pixels=256, grid=grid_dir, seed=1, overwrite=True)
    assert len(list((out / "truth").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary leftovers
    # overwrite replaces a simulated survey only: a directory of the user's was deleted.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FluxCalError, match=r"mine: exists and is not a simulated survey \(no "
                                           r"survey\.json\): not replaced"):
        simulate_survey(mine, exposures=1, pixels=256, grid=grid_dir, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- parts


def test_grid_stars_read_once_and_interpolate(grid_dir, stars):
    scan = scan_bosz(grid_dir)
    model = next(m for m in scan["models"] if m["teff"] == 6500 and m["logg"] == 4.5
                 and m["feh"] == 0.0)
    node = stars.spectrum(6500.0, 4.5, 0.0, 0.0)
    np.testing.assert_array_equal(node, read_bosz_spectrum(model["path"], node.size)[0])
    both = stars.spectrum([6500.0, 7000.0, 6750.0], 4.5, 0.0)
    np.testing.assert_allclose(both[2], 0.5 * (both[0] + both[1]), rtol=1e-12)
    read = stars.files_read
    stars.spectrum(6750.0, 4.5, 0.0)
    assert stars.files_read == read <= len(scan["models"])
    drawn = stars.sample(np.random.default_rng(0), 50)
    assert np.all(stars.complete(drawn["teff"], drawn["logg"], drawn["feh"], drawn["alpha"]))


def test_doppler_shift_moves_a_line_by_v_over_c():
    wave = np.exp(np.arange(np.log(5000.0), np.log(5200.0), 1e-5))
    line = 1.0 - 0.5 * np.exp(-0.5 * ((wave - 5100.0) / 0.3) ** 2)
    np.testing.assert_allclose(doppler_shift(wave, line, 0.0), line, atol=1e-12)
    shifted = 1.0 - doppler_shift(wave, line, [150.0])
    centre = np.sum(wave * shifted) / np.sum(shifted)
    assert centre == pytest.approx(5100.0 * (1 + 150.0 / SPEED_OF_LIGHT_KMS), abs=0.005)


@pytest.mark.parametrize("setup", [DEFAULT_SETUP, ISOPLANE_SETUP], ids=lambda s: s.name)
def test_telluric_transmission_is_one_outside_the_mask(setup):
    wave = setup.wavelength
    trans = telluric_transmission(wave, setup.lsf, airmass=2.0, pwv=2.5)
    # Outside the default mask padded by one FWHM (as the fitter pads it), no absorption.
    outside = region_mask(wave, "telluric_default", pad=setup.lsf.fwhm(wave))
    assert trans[outside].min() > 0.9999
    for lo, hi in load_regions("telluric_default"):
        if hi < wave[-1]:
            assert trans[(wave > lo) & (wave < hi)].min() < 0.9


def test_setup_lsf_and_validation():
    setup = Setup("test", pixels=1000, fibers=8, fwhm_pixels=(2.5, 2.0, 2.2))
    ends = setup.lsf.fwhm(np.array([setup.wave_min, 6000.0, setup.wave_max]))
    np.testing.assert_allclose(ends / setup.dispersion, [2.5, 2.0, 2.2], rtol=1e-10)
    with pytest.raises(ValueError, match="fibers"):
        Setup(fibers=4)
    with pytest.raises(ValueError, match="wave_min"):
        Setup(wave_min=8500.0, wave_max=3500.0)
    # A line spread the reader would refuse (resolving power below 10) is refused here.
    with pytest.raises(ValueError, match=r"resolving power of 8\.8\d*, below the 10"):
        Setup(pixels=64, fwhm_pixels=(5.0, 5.0, 5.0))
    with pytest.raises(ValueError, match="not positive at every pixel"):
        Setup(pixels=100, fwhm_pixels=(3.0, 0.01, 0.01))  # a parabola below 0 near the red
    assert Setup(pixels=64).pixels == 64  # the smallest spectra of the defaults: R ~ 18
    # ... and one sampled with more than 20 or fewer than 0.25 pixels per FWHM.
    with pytest.raises(ValueError, match=r"spans 25-25 pixels, beyond the 0\.25-20 the reader"):
        Setup(fwhm_pixels=(25.0, 25.0, 25.0))
    with pytest.raises(ValueError, match=r"spans 0\.2-0\.3 pixels, beyond the 0\.25-20"):
        Setup(fwhm_pixels=(0.3, 0.2, 0.3))


def test_setups_alternate(tmp_path, grid_dir):
    setups = [Setup("blue", pixels=300, fibers=8, wave_min=3600.0, wave_max=6000.0),
              {"name": "iso", "pixels": 400, "fibers": 10}]
    out = simulate_survey(tmp_path / "s", exposures=3, nights=1, grid=grid_dir, setups=setups)
    entries = json.loads((out / "survey.json").read_text())["exposures"]
    assert [e["setup"] for e in entries] == ["blue", "iso", "blue"]
    shapes = [open_exposure(out / e["path"])["flux"].shape for e in entries]
    assert shapes == [(8, 300), (10, 400), (8, 300)]
    assert entries[0]["setup_key"] == entries[2]["setup_key"] != entries[1]["setup_key"]


def test_airmass_and_water_ranges_map_the_same_draws(tmp_path, grid_dir):
    """``airmass_range`` and ``pwv_range`` move the exposures' airmass and water into the
    given ranges with the same random numbers: everything else drawn is as by default, and
    the default ranges given explicitly change no byte of the exposures."""
    kwargs = {"exposures": 3, "nights": 1, "pixels": 256, "grid": grid_dir, "seed": 8}
    default = simulate_survey(tmp_path / "default", **kwargs)
    explicit = simulate_survey(tmp_path / "explicit", airmass_range=(1.0, 2.0),
                               pwv_range=(0.4, 2.5), **kwargs)
    humid = simulate_survey(tmp_path / "humid", airmass_range=(2.2, 2.8), pwv_range=(5.0, 8.0),
                            **kwargs)
    trees = [{k: v for k, v in _tree(s).items() if k != "survey.json"}
             for s in (default, explicit)]
    assert trees[0] == trees[1]
    infos = [json.loads((s / "survey.json").read_text()) for s in (default, humid)]
    assert "airmass_range" not in infos[0]["options"]
    assert infos[1]["options"]["airmass_range"] == [2.2, 2.8]
    assert infos[1]["options"]["pwv_range"] == [5.0, 8.0]
    water = (8100.0, 8360.0)
    for a, b in zip(*(i["exposures"] for i in infos), strict=True):
        ta, tb = (dict(np.load(s / e["truth"])) for s, e in ((default, a), (humid, b)))
        assert 2.2 <= tb["airmass"] <= 2.8 and 5.0 <= tb["pwv"] <= 8.0
        assert b["airmass"] == tb["airmass"] and b["pwv"] == tb["pwv"]
        # The same uniform numbers, mapped into the other range (airmass rounded to 1e-4).
        assert (tb["pwv"] - 5.0) / 3.0 == pytest.approx((ta["pwv"] - 0.4) / 2.1, abs=1e-12)
        assert (tb["airmass"] - 2.2) / 0.6 == pytest.approx(ta["airmass"] - 1.0, abs=2e-4)
        for key in ("exptime", "transparency", "aerosol", "temperature", "water_width",
                    "std_teff", "std_fiber", "fiber_kind"):
            np.testing.assert_array_equal(ta[key], tb[key])
        band = (ta["wavelength"] > water[0]) & (ta["wavelength"] < water[1])
        assert tb["telluric"][band].mean() < ta["telluric"][band].mean()
    with pytest.raises(ValueError, match=r"airmass_range=\(0.8, 2.0\): need 1 <= low <= high"):
        simulate_survey(tmp_path / "bad", airmass_range=(0.8, 2.0), **kwargs)
    with pytest.raises(ValueError, match=r"pwv_range=\(3.0, 2.0\): need 0 <= low <= high"):
        simulate_survey(tmp_path / "bad", pwv_range=(3.0, 2.0), **kwargs)


def test_every_truth_entry_is_documented(stars):
    """The truth file's entries, with every option that adds some, are all named in the
    "Truth file" section of the exposure module's docstring (``response_fiber``,
    ``temperature`` and ``water_width`` were written but not described)."""
    import re

    from kspec_fluxcal.sim import exposure

    sim = simulate_exposure(3, stars, setup=Setup("doc", pixels=300, fibers=8),
                            wavelength_format="wavela2d", fiber_lsf_scatter=0.02,
                            chromatic_losses=True, xp=True)
    section = exposure.__doc__.split("Truth file (")[1].split("\nChromatic losses (")[0]
    named = set(re.findall(r"[a-z][a-z0-9_]*", section))
    assert sorted(set(sim.truth) - named) == []
