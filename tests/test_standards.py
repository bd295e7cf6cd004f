"""Standard-star fitting and per-star calibration vectors on simulated exposures."""

import re
import warnings

import numpy as np
import pytest
import xarray as xr
from conftest import SELF_MODEL, SHARED_REAL, requires_shared, star_vector_error

from kspec_fluxcal.calibration import combine_vectors, running_median
from kspec_fluxcal.catalog import read_catalog
from kspec_fluxcal.errors import CalibrationError, FluxCalWarning
from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.fit.exposure_templates import template_library
from kspec_fluxcal.fit.standards import fit_standards
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.masks import region_mask
from kspec_fluxcal.sim import (
    GridStars,
    Setup,
    simulate_exposure,
    write_catalog,
    write_synthetic_grid,
)

SETUP = Setup(name="test", pixels=2048, fibers=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic grid, its cube, and a star sampler."""
    root = tmp_path_factory.mktemp("standards")
    bosz = write_synthetic_grid(root / "bosz", small=True, workers=2)
    cube = build_grid(bosz, root / "grid.zarr", progress=False)
    return {"root": root, "stars": GridStars(bosz), "grid": open_grid(cube)}


def _exposure(world, seed, tmp_path, n_standards=3, snr=(60, 100), **kwargs):
    sim = simulate_exposure(seed, world["stars"], setup=SETUP, n_standards=n_standards,
                            snr_range=snr, **kwargs)
    red = tmp_path / f"red{seed}.fits"
    sim.hdulist.writeto(red)
    cat = tmp_path / f"cat{seed}.csv"
    write_catalog(cat, sim.catalog)
    return open_exposure(red), read_catalog(cat), sim.truth, sim.catalog


@pytest.fixture(scope="module")
def fitted(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fitted")
    exposure, catalog, truth, rows = _exposure(world, 11, tmp)
    config = SELF_MODEL
    setup = template_library(world["grid"], exposure, config)
    return {"exposure": exposure, "catalog": catalog, "truth": truth, "rows": rows,
            "setup": setup, "stars": fit_standards(exposure, catalog, setup, config)}


def test_colours_beyond_the_grid_give_a_colour_teff_beyond_it(fitted):
    """The library's own colour-Teff relation ends at its templates' Teff; a star whose
    colours are those of a 9000 K star must not be placed at that end (where the grid-edge
    rejection could never fire) but at the wider shipped relation's Teff."""
    from kspec_fluxcal.catalog import match_standards
    from kspec_fluxcal.fit.inputs import catalog_priors
    from kspec_fluxcal.templates import library_arrays

    library = fitted["setup"]
    matched = match_standards(fitted["exposure"], fitted["catalog"]).copy(deep=True)
    mag = matched["mag"]
    for blue, red, colour in (("gaiadr2-BP", "gaiadr2-RP", -0.25), ("panstarrs-g",
                                                                    "panstarrs-r", -0.18)):
        mag.loc[{"band": blue}] = mag.sel(band=red) + colour
    prior = catalog_priors(matched, library, SELF_MODEL)
    top = library_arrays(library)["teff"][-1]
    assert top < 8000
    assert np.all(prior.teff_colour > 8800)
    # colours inside the grid's range keep the library's own relation
    inside = catalog_priors(match_standards(fitted["exposure"], fitted["catalog"]), library,
                            SELF_MODEL)
    assert np.all(inside.teff_colour < top)


def test_a_one_template_grid_fits_without_an_internal_error(world, fitted, tmp_path):
    """One template: nothing to refine (the quadratic of no axis was a ValueError deep in
    the refinement); the stars are fitted with it and flagged where their colours differ."""
    import shutil

    copy = tmp_path / "one"
    shutil.copytree(world["root"] / "bosz", copy)
    for path in copy.rglob("*.txt.gz"):
        if "_t6000_g+4.5_m+0.00_a+0.00" not in path.name:
            path.unlink()
    with pytest.warns(FluxCalWarning, match="one teff and one logg only"):
        cube = build_grid(copy, tmp_path / "one.zarr", progress=False)
    library = template_library(open_grid(cube), fitted["exposure"], SELF_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FluxCalWarning)
        stars = fit_standards(fitted["exposure"], fitted["catalog"], library, SELF_MODEL)
    assert np.all(stars["teff"].values == 6000.0)
    assert all(s == "ok" or s.startswith(("outside the grid", "model error", "photometry"))
               for s in stars["status"].values)


def test_models_across_a_grid_hole_are_flagged(world, fitted, tmp_path):
    import shutil

    from kspec_fluxcal.fit.acceptance import _hole_share

    copy = tmp_path / "diagonal"
    shutil.copytree(world["root"] / "bosz", copy)
    keep = ("mp_t6000_g+4.0_m+0.00_a+0.00", "mp_t6500_g+4.5_m+0.00_a+0.00")
    for path in copy.rglob("*.txt.gz"):
        if not any(k in path.name for k in keep):
            path.unlink()
    with pytest.warns(FluxCalWarning, match="2 of its 4 grid points are missing"):
        cube = build_grid(copy, tmp_path / "diagonal.zarr", progress=False)
    library = template_library(open_grid(cube), fitted["exposure"], SELF_MODEL)
    params = {"teff": np.array([6250.0, 6000.0]), "logg": np.array([4.25, 4.0]),
              "feh": np.zeros(2), "alpha": np.zeros(2)}
    np.testing.assert_allclose(_hole_share(library, params), [0.5, 0.0])


def test_output_structure(fitted):
    stars = fitted["stars"]
    assert stars["cal"].dims == ("star", "wavelength")
    assert stars.sizes["star"] == 3
    for name in ("cal", "cal_variance", "cal_mask", "model_flux", "mag_obs", "phot_resid"):
        assert name in stars
    for name in ("fiber", "objid", "teff", "logg", "feh", "alpha", "ebv", "rv", "scale",
                 "chi2_dof", "phot_rms", "status", "teff_err", "rv_err", "ebv_catalog",
                 "alpha_err"):
        assert name in stars.coords
    assert stars["cal"].attrs["units"] == "1e-17 erg/(s cm2 Angstrom) / count"
    assert list(stars["status"].values) == ["ok"] * 3


def test_parameters_recovered(fitted):
    stars, truth = fitted["stars"], fitted["truth"]
    for k, fiber in enumerate(truth["std_fiber"]):
        s = list(stars["fiber"].values).index(fiber)
        assert abs(stars["teff"].values[s] - truth["std_teff"][k]) < 150
        assert abs(stars["rv"].values[s] - truth["std_rv"][k]) < 5
        assert abs(stars["ebv"].values[s] - truth["std_ebv"][k]) < 0.02
        assert 0.5 < stars["chi2_dof"].values[s] < 2.0
        assert stars["phot_rms"].values[s] < 0.05
        assert np.isfinite(stars["teff_err"].values[s]) and stars["rv_err"].values[s] < 5


def test_star_vectors_match_the_true_response(fitted):
    stars, truth = fitted["stars"], fitted["truth"]
    for s in range(stars.sizes["star"]):
        shape, level = star_vector_error(stars, truth, s)
        assert shape < 0.01
        assert abs(level) < 0.02  # the photometric scale
    # Telluric bands are in the vector (not masked): Cal is higher in the O2 A band.
    wave = stars["wavelength"].values
    a_band = (wave > 7600) & (wave < 7690)
    assert stars["cal_mask"].values[0, a_band].all()
    # Line cores are masked.
    assert not stars["cal_mask"].values[0, ~region_mask(wave, "stellar_lines")].any()


def test_no_reddening_is_worse(world, fitted):
    # Without the photometric warp, whose slope would take up part of the reddening's tilt.
    config = SELF_MODEL.replace(reddening=False, warp_degree=0)
    plain = fit_standards(fitted["exposure"], fitted["catalog"], fitted["setup"], config)
    with_red = [star_vector_error(fitted["stars"], fitted["truth"], s)[0] for s in range(3)]
    without = [star_vector_error(plain, fitted["truth"], s)[0] for s in range(3)]
    assert np.all(plain["ebv"].values == 0)
    # The stars are reddened by E(B-V) 0.01-0.12: ignoring it tilts the vectors.
    assert max(without) > 0.01 > max(with_red)
    assert np.mean(without) > 2 * np.mean(with_red)


def test_combined_calibration(fitted):
    comb = combine_vectors(fitted["stars"])
    truth = fitted["truth"]
    std = truth["std_fiber"]
    true_cal = 1.0 / truth["response"] / np.mean(truth["aperture"][std])
    wave = comb["wavelength"].values
    smooth = running_median(comb["cal"].values / true_cal, wave)
    use = (wave > 4000) & (wave < 8400) & region_mask(wave, "telluric_default")
    assert np.std(smooth[use] / np.median(smooth[use])) < 0.006
    assert abs(np.median(smooth[use]) - 1) < 0.02


def test_the_configured_bands_are_fitted_whatever_the_catalogs_band_order(fitted):
    """The configured bands are taken from the matched rows (the catalog itself is matched,
    so that its look-up index is kept from one exposure to the next): a catalog with its bands
    in another order, or with bands the configuration leaves out, gives the fit of a catalog
    with the configured bands alone, in the configuration's order."""
    exposure, catalog, library = fitted["exposure"], fitted["catalog"], fitted["setup"]
    reversed_bands = catalog.isel(band=np.arange(catalog.sizes["band"])[::-1])
    xr.testing.assert_identical(fit_standards(exposure, reversed_bands, library, SELF_MODEL),
                                fitted["stars"])
    bands = list(SELF_MODEL.photometry.bands)[::2]
    fewer = SELF_MODEL.replace(photometry__bands=bands)
    out = fit_standards(exposure, catalog, library, fewer)
    assert list(out["band"].values) == bands
    xr.testing.assert_identical(out, fit_standards(exposure, catalog.sel(band=bands), library,
                                                   fewer))


def test_a_lazy_exposure_gives_the_fit_of_an_eager_one(fitted):
    """A Dask-backed exposure was fitted lazily (xr.map_blocks), whose result kept its
    template's attrs, not the fit's: no fitted line spread, so the combination skipped the
    telluric fit and the calibration differed by up to 4.6 %. The standards' fibers are read
    for the fit; the exposure stays lazy."""
    exposure = fitted["exposure"]
    lazy = exposure.assign({v: exposure[v].chunk({"fiber": 4}) for v in exposure.data_vars})
    out = fit_standards(lazy, fitted["catalog"], fitted["setup"], SELF_MODEL)
    assert lazy["flux"].chunks is not None
    xr.testing.assert_identical(out, fitted["stars"])
    assert out.attrs == fitted["stars"].attrs and out.attrs["lsf_fwhm_coeffs"]


def test_rejection_reasons(world, tmp_path, fitted):
    exposure, rows = fitted["exposure"], fitted["rows"]
    std_rows = [r for r in rows if r["_role"] == "standard"]
    # Star 0: no catalog entry. Star 1: one valid band. Star 2: photometry of another star.
    rows2 = [r for r in rows if r is not std_rows[0]]
    one_band = dict(std_rows[1])
    for col in ("Gaia", "BP", "RP", "g", "r", "i", "z", "J", "H", "K"):
        if col != "r":
            one_band[col] = "99.999"
    if one_band["r"] == "99.999":  # the simulator drops a PS1 band of some stars
        one_band["r"], one_band["dr"] = "15.000", "0.010"
    rows2[rows2.index(std_rows[1])] = one_band
    wrong = dict(std_rows[2])
    for col in ("g", "r", "i", "z"):
        wrong[col] = f"{float(wrong[col]) + (0.3 if col in 'gi' else -0.3):.3f}"
    rows2[rows2.index(std_rows[2])] = wrong
    write_catalog(tmp_path / "c.csv", rows2)
    with pytest.warns(UserWarning, match="no catalog entry"):
        stars = fit_standards(exposure, read_catalog(tmp_path / "c.csv"), fitted["setup"])
    by_fiber = dict(zip(stars["fiber"].values, stars["status"].values, strict=True))
    assert by_fiber[int(std_rows[0]["_fiber"])] == "no catalog match"
    assert by_fiber[int(std_rows[1]["_fiber"])] == "fewer than 2 valid bands (1)"
    assert by_fiber[int(std_rows[2]["_fiber"])].startswith("photometry disagrees with the "
                                                          "spectrum: rms")
    assert len(by_fiber) == 3


def _photometric_score(fitted):
    """The self-model fit's standards' PhotometricScore, its library and its counts."""
    from kspec_fluxcal.catalog import match_standards
    from kspec_fluxcal.fit.inputs import catalog_priors
    from kspec_fluxcal.fit.model_photometry import PhotometricScore

    library, config = fitted["setup"], SELF_MODEL
    matched = match_standards(fitted["exposure"], fitted["catalog"])
    matched = matched.sel(band=[b for b in config.photometry.bands
                                if b in matched["band"].values])
    phot = PhotometricScore(matched, library, catalog_priors(matched, library, config), config)
    return phot, library, matched.sizes["star"], library.sizes["template"]


def test_node_scores_of_several_stars_are_each_stars_own(fitted):
    """The photometric scores of the grid's nodes (the parameter choice's first scores) for
    every star in one call are, bit for bit, each star's scores of templates one by one."""
    import scipy.sparse

    from kspec_fluxcal.templates import library_arrays

    phot, library, nstar, ntemplate = _photometric_score(fitted)
    assert nstar >= 2
    ids = np.arange(0, ntemplate, 2)
    together = phot.nodes(np.arange(nstar), ids)
    assert together.shape == (nstar, ids.size) and np.isfinite(together).any()
    logg = library_arrays(library)["template_logg"]
    for s in range(nstar):
        for j, t in enumerate(ids):
            one = scipy.sparse.csr_matrix(([1.0], ([0], [t])), shape=(1, ntemplate))
            alone = phot(s, one, np.array([[0.0, logg[t], 0.0, 0.0]]))
            assert together[s, j].tobytes() == alone.tobytes()


def test_final_photometry_is_each_models_own_fit(fitted):
    """The final models' photometry and the best templates' rms, fitted in one call, are bit
    for bit what each model's own fit gives (NaN rms for a star without a usable template)."""
    from types import SimpleNamespace

    import scipy.sparse

    from kspec_fluxcal.fit.model_photometry import final_photometry

    phot, library, nstar, ntemplate = _photometric_score(fitted)
    rng = np.random.default_rng(3)
    cols = rng.choice(ntemplate, (nstar, 2), replace=False)
    weights = scipy.sparse.csr_matrix((np.tile([0.3, 0.7], nstar),
                                       (np.repeat(np.arange(nstar), 2), cols.ravel())),
                                      shape=(nstar, ntemplate))
    scan = SimpleNamespace(best=rng.choice(ntemplate, nstar),
                           usable=np.arange(nstar) != nstar - 1)
    pf, rms = final_photometry(phot, weights, scan)
    assert np.isnan(rms[-1])
    for s in range(nstar):
        own = phot.fit(s, weights[s])
        for key, value in own.items():
            assert np.asarray(pf[key][s]).tobytes() == np.asarray(value[0]).tobytes(), key
        if scan.usable[s]:
            best = scipy.sparse.csr_matrix(([1.0], ([0], [scan.best[s]])), shape=(1, ntemplate))
            assert rms[s].tobytes() == phot.fit(s, best)["rms"][0].tobytes()


def test_model_error_of_each_star_is_its_own_and_solves_its_chi2():
    """The model error sigma_m makes chi^2/dof of a star 1 (0 for a star within its noise,
    NaN for one with no pixel compared), and a star's sigma_m does not depend on the stars
    fitted with it: bit for bit what it gets alone."""
    from types import SimpleNamespace

    from kspec_fluxcal.fit.final_model import _model_error, _residuals

    rng = np.random.default_rng(5)
    wave = np.linspace(4000.0, 8000.0, 600)
    model = 1.0 - 0.5 * rng.random((4, wave.size)) ** 8
    ivar = np.full(model.shape, 1e4)
    mismatch = np.array([0.03, 0.0, 0.1, 0.02])[:, None]
    noise = np.array([1.0, 0.5, 1.0, 1.0])[:, None]  # star 1: less than its variance says
    norm = model * (1 + mismatch * rng.standard_normal(model.shape)) \
        + noise * rng.standard_normal(model.shape) / np.sqrt(ivar)
    norm[3] = np.nan  # no pixel to compare
    scan = SimpleNamespace(knots=None)

    def errors(rows):
        obs = SimpleNamespace(norm=norm[rows], ivar=ivar[rows], wave=wave, nstar=len(rows))
        return _model_error(_residuals(obs, model[rows]), obs, scan)

    chi2_dof, sigma = errors([0, 1, 2, 3])
    assert chi2_dof[1] < 1.0 and sigma[1] == 0.0 and np.isnan(sigma[3])
    for s in (0, 2):
        assert sigma[s] == pytest.approx(mismatch[s, 0], rel=0.1)
        var, r2 = 1.0 / ivar[s], (norm[s] - model[s]) ** 2
        dof = wave.size - 1
        assert np.sum(r2 / (var + (sigma[s] * model[s]) ** 2)) / dof == pytest.approx(1.0, 1e-9)
    for s in range(4):
        alone = errors([s])
        np.testing.assert_array_equal(alone[0], chi2_dof[s:s + 1])
        np.testing.assert_array_equal(alone[1], sigma[s:s + 1])


def test_final_models_moved_as_the_shift_operators_move_them():
    """The final models moved to each star's velocity and pixels all at once are what each
    star's shift operator gives (to its 1e-6 A rounding of the wavelengths), NaN beyond the
    ends alike, for every one of several spectra."""
    from types import SimpleNamespace

    from kspec_fluxcal.fit.final_model import _moved
    from kspec_fluxcal.fit.shifts import shift_spectra

    rng = np.random.default_rng(8)
    wave = np.linspace(3700.0, 9800.0, 3000)
    star_wave = wave + rng.normal(0.0, 0.3, (3, 1)) + 2e-4 * np.arange(wave.size) * rng.normal(
        0.0, 1.0, (3, 1))
    obs = SimpleNamespace(nstar=3, star_wave=star_wave, wave=wave)
    rv = np.array([-150.3, 12.7, 333.1])
    spectra = [1.0 + 0.3 * rng.random((3, 1)) * np.sin(wave / d) for d in (3.0, 7.0)]
    for moved, spectrum in zip(_moved(obs, rv, *spectra), spectra, strict=True):
        expected = np.stack([shift_spectra(spectrum[s], star_wave[s], rv[s], wave)
                             for s in range(3)])
        np.testing.assert_array_equal(np.isnan(moved), np.isnan(expected))
        assert np.isnan(moved[0, -1]) and np.isnan(moved[2, 0])
        np.testing.assert_allclose(moved, expected, rtol=1e-6)


def test_model_error_newton_agrees_with_bisection_and_keeps_its_bounds():
    """The model error's Newton steps find the root a plain bisection in log sigma_m finds
    (to its 1e-12 dex), and a root beyond 1e-5 or 1 gives that bound (to the bisection's
    1e-13 dex)."""
    from kspec_fluxcal.fit.final_model import _mismatch

    rng = np.random.default_rng(11)
    npix = 800
    model = 1.0 - 0.7 * rng.random((6, npix)) ** 6
    var = np.full(model.shape, 1e-4)
    var[:, ::7] = np.inf  # pixels not compared
    sigma_true = np.array([0.003, 0.02, 0.1, 0.5, 1e-7, 30.0])[:, None]
    resid2 = model**2 * sigma_true**2 * rng.chisquare(1, model.shape) + var * rng.chisquare(
        1, model.shape)
    resid2[:, ::7] = 0.0
    dof = np.isfinite(var).sum(axis=1) - 1.0
    # chi^2/dof 1 + 1e-11 at sigma_m = 0: a root below 1e-5
    resid2[4] = np.where(np.isfinite(var[4]), var[4] * (1 + 1e-11) * dof[4] / (dof[4] + 1), 0)
    m2 = model**2

    lo, hi = np.full(6, -5.0), np.zeros(6)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        chi2 = np.sum(resid2 / (var + (10.0 ** mid[:, None]) ** 2 * m2), axis=1) / dof
        lo, hi = np.where(chi2 > 1.0, mid, lo), np.where(chi2 > 1.0, hi, mid)
    bisection = 10.0 ** (0.5 * (lo + hi))

    sigma = _mismatch(resid2, var, m2, dof)
    np.testing.assert_allclose(sigma[:4], bisection[:4], rtol=1e-10)
    assert sigma[4] == pytest.approx(1e-5, rel=1e-12) and sigma[5] == pytest.approx(1.0, rel=1e-12)
    for s in range(6):  # each star's steps are its own
        alone = _mismatch(resid2[s:s + 1], var[s:s + 1], m2[s:s + 1], dof[s:s + 1])
        assert alone.tobytes() == sigma[s:s + 1].tobytes()


def test_low_snr_and_model_error_bound(fitted):
    noisy = fitted["exposure"].copy()
    fiber = int(fitted["stars"]["fiber"].values[0])
    noisy["variance"] = noisy["variance"].where(noisy["fiber"] != fiber,
                                                noisy["variance"] * 1e4)
    stars = fit_standards(noisy, fitted["catalog"], fitted["setup"])
    status = stars["status"].values[0]
    assert status.startswith("S/N ") and status.endswith("< 5")
    strict = fit_standards(fitted["exposure"], fitted["catalog"], fitted["setup"],
                           SELF_MODEL.replace(max_model_error=1e-4))
    assert all(s.startswith("model error") for s in strict["status"].values)


def test_huber_resists_sky_residuals(world, tmp_path, fitted):
    spiky = fitted["exposure"].copy(deep=True)
    rng = np.random.default_rng(3)
    flux = spiky["flux"].values
    for fiber in fitted["stars"]["fiber"].values:
        pix = rng.choice(flux.shape[1], 30, replace=False)
        flux[fiber, pix] += 0.5 * np.nanmedian(flux[fiber])  # not in the variance
    stars = fit_standards(spiky, fitted["catalog"], fitted["setup"],
                          SELF_MODEL.replace(metric="huber"))
    truth = fitted["truth"]
    for k, fiber in enumerate(truth["std_fiber"]):
        s = list(stars["fiber"].values).index(fiber)
        assert abs(stars["teff"].values[s] - truth["std_teff"][k]) < 200


@requires_shared
@pytest.mark.parametrize("name", ["hd106252_stis_008", "p330e_stiswfcnic_006", "16cygb_stis_004"])
def test_real_calspec_star_through_a_simulated_instrument(tmp_path, name):
    """A real G star (HST CALSPEC), observed through a simulated instrument and calibrated with
    the two real BOSZ 2024 spectra of ../shared: template mismatch with the real thing."""
    import csv

    from astropy.io import fits

    from kspec_fluxcal.constants import CATALOG_COLUMNS, VEGA_TO_AB
    from kspec_fluxcal.exposure import red_hdulist
    from kspec_fluxcal.lsf import LineSpread
    from kspec_fluxcal.pipeline import calibrate_exposure
    from kspec_fluxcal.sim import CATALOG_HEADER
    from kspec_fluxcal.templates import convolution_matrix
    from kspec_fluxcal.wavelength import vacuum_to_air

    calspec = SHARED_REAL / "calspec"
    row = {r["file"]: r for r in csv.DictReader(open(calspec / "INDEX.csv"))}[f"{name}.fits.gz"]
    data = fits.getdata(calspec / f"{name}.fits.gz", 1)
    wave_in = vacuum_to_air(np.asarray(data["WAVELENGTH"], float))
    flux_in = np.asarray(data["FLUX"], float)
    keep = (wave_in > 3000) & (wave_in < 10000) & (flux_in > 0)
    wave = np.linspace(3600.0, 8400.0, 1340)  # the IsoPlane-320 setup
    # CALSPEC's own resolution is R ~ 800 (STIS G430L/G750L); the instrument is coarser.
    matrix, _ = convolution_matrix(wave_in[keep], wave, LineSpread.constant(12.0), 800.0)
    response = 30 * np.exp(-0.5 * ((wave - 6000) / 2000) ** 2) * (1 + 0.1 * np.sin(wave / 700))
    counts = (matrix @ (flux_in[keep] / 1e-17)) * response
    response *= 1e4 / np.median(counts)  # S/N ~ 100 per pixel
    counts *= 1e4 / np.median(counts)
    noisy = counts + np.random.default_rng(0).normal(0, np.sqrt(counts))
    fibres = {"NAME": np.array(["std", "sky"]), "TYPE": np.array(["C", "S"]),
              "RA": np.array([10.0, 10.1]), "DEC": np.array([5.0, 5.0]), "OBJID": np.array([1, -1])}
    red = tmp_path / "red.fits"
    red_hdulist(np.vstack([noisy, np.zeros_like(noisy)]), np.vstack([counts, np.ones_like(counts)]),
                fibres, {"EXPTIME": 600.0, "MJD-OBS": 61000.3, "SPECFWHM": 12.0},
                wavelength=wave).writeto(red)
    cat = dict.fromkeys(CATALOG_HEADER, "0")
    cat.update(objid=1, RA=10.0, Dec=5.0)
    for band, (mag, err) in CATALOG_COLUMNS.items():
        cat[mag] = f"{float(row['AB_' + band]) - VEGA_TO_AB.get(band, 0.0):.4f}"
        cat[err] = "0.01"
    write_catalog(tmp_path / "cat.csv", [cat])
    with pytest.warns(FluxCalWarning, match="2 of its 4 grid points are missing"):
        grid = build_grid(SHARED_REAL / "bosz2024_r5000", tmp_path / "bosz.zarr",
                          progress=False)
    # The made-up response has no physical scale: no throughput check.
    result = calibrate_exposure(red, tmp_path / "cat.csv", grid, out=tmp_path / "out",
                                throughput_min=0.0, throughput_max=1.0)
    assert any("one usable standard star" in w for w in result.warnings)
    stars = result.stars
    assert stars["status"].values[0] == "ok"
    # Two templates at opposite corners of a (teff, logg) cell: many (teff, logg) give the
    # same mixture, so judge the mixture's Teff (its weighted templates), not the label.
    cube = open_grid(grid).templates
    index, weight = cube.interpolation_weights(*(stars[p].values for p in
                                                 ("teff", "logg", "feh", "alpha")))
    teff_nodes = cube.axes["teff"][index[0, :, 0]]
    assert abs(weight[0] @ teff_nodes - float(row["model_teff"])) < 300
    assert stars["phot_rms"].values[0] < 0.03
    ratio = running_median(result.calibration["cal"].values * response, wave)
    use = (wave > 4000) & (wave < 8300)
    shape = np.std(ratio[use] / np.median(ratio[use]))
    assert shape < 0.03  # two templates only: mismatch with a real star, still a few %
    assert abs(np.median(ratio[use]) - 1) < 0.02


# ----------------------------------------------------------------------------- acceptance


def _mismatched(exposure, fiber, level, snr_gain=1.0, seed=5):
    """``exposure`` with a template mismatch of ``level`` (fractional rms, structure on a few
    pixels like line-strength errors, not in the variance) in one fiber's counts, and that
    fiber's noise lowered ``snr_gain`` times (its counts' noise is kept: only the variance
    the fit weights by shrinks, as for a brighter star whose residual is the mismatch)."""
    out = exposure.copy(deep=True)
    rng = np.random.default_rng(seed)
    pattern = np.convolve(rng.standard_normal(out.sizes["wavelength"] + 4), np.ones(5) / 5,
                          mode="valid")
    pattern *= level / pattern.std()
    out["flux"].values[fiber] *= 1.0 + pattern
    out["variance"].values[fiber] /= snr_gain**2
    return out


def test_bright_star_with_a_template_mismatch_is_accepted_and_used(fitted):
    """2 % mismatch at S/N ~200: chi2/dof ~ 1 + (0.02 x 200)^2 ~ 17, which a chi2/dof limit
    (the old rule: 10) rejected; it is a quality figure, carried into the star's weight."""
    fiber = int(fitted["stars"]["fiber"].values[0])
    exposure = _mismatched(fitted["exposure"], fiber, 0.02, snr_gain=2.5)
    stars = fit_standards(exposure, fitted["catalog"], fitted["setup"])
    s = list(stars["fiber"].values).index(fiber)
    assert stars["chi2_dof"].values[s] > 10
    assert stars["status"].values[s] == "ok"
    assert stars["model_error"].values[s] == pytest.approx(0.02, rel=0.3)
    others = [k for k in range(3) if k != s]
    assert np.all(stars["model_error"].values[others] < 0.01)
    comb = combine_vectors(stars)
    assert comb["used"].values.all() and comb.attrs["fcalnstr"] == 3
    # Its weight: the model error caps the star's per-pixel S/N at ~1/0.02 = 50.
    rel = np.sqrt(stars["cal_variance"].values[s]) / stars["cal"].values[s]
    assert np.nanmedian(rel) > 0.018
    assert comb.attrs["fcalmerr"] < 0.01  # the median of the stars used


def test_wrong_star_photometry_one_mag_grey_is_rejected_with_that_reason(fitted, tmp_path):
    """One standard of three with photometry 1 mag too faint in every band (another star's):
    its colours fit, its level cannot (a factor 2.5, beyond any aperture loss)."""
    rows = [dict(r) for r in fitted["rows"]]
    std_rows = [r for r in rows if r["_role"] == "standard"]
    for col in ("Gaia", "BP", "RP", "g", "r", "i", "z", "J", "H", "K"):
        if std_rows[1][col] != "99.999":
            std_rows[1][col] = f"{float(std_rows[1][col]) + 1.0:.3f}"
    write_catalog(tmp_path / "c.csv", rows)
    stars = fit_standards(fitted["exposure"], read_catalog(tmp_path / "c.csv"), fitted["setup"])
    comb = combine_vectors(stars)
    s = list(comb["fiber"].values).index(int(std_rows[1]["_fiber"]))
    assert not comb["used"].values[s]
    assert re.match(r"rejected in combination: .*level \+1\d\d% from the others \(photometry "
                    r"of another star, or a blend\?\)", str(comb["star_status"].values[s]))
    assert comb.attrs["fcalnstr"] == 2


def test_one_bad_star_among_three_is_rejected_as_an_outlier(fitted):
    """A standard whose counts are tilted by 15 % across the range (a bad extraction): its
    vector's shape disagrees with the two others'."""
    exposure = fitted["exposure"].copy(deep=True)
    fiber = int(fitted["stars"]["fiber"].values[2])
    wave = exposure["wavelength"].values
    exposure["flux"].values[fiber] *= 1 + 0.15 * (wave - 6000) / 2500
    stars = fit_standards(exposure, fitted["catalog"], fitted["setup"])
    comb = combine_vectors(stars)
    s = list(comb["fiber"].values).index(fiber)
    assert not comb["used"].values[s]
    assert str(comb["star_status"].values[s]).startswith("rejected in combination: shape")
    assert comb.attrs["fcalnstr"] == 2


def test_only_standard_with_a_poor_fit_still_calibrates_with_a_low_grade(fitted):
    """One standard left (the others are program targets) with a 5 % model error: the
    exposure calibrates, graded C, the star's mismatch in FCALMERR."""
    exposure = fitted["exposure"].copy(deep=True)
    std = list(fitted["stars"]["fiber"].values)
    types = exposure["fiber_type"].values.copy()
    types[std[1:]] = "P"
    exposure = exposure.assign_coords(fiber_type=("fiber", types))
    exposure = _mismatched(exposure, std[0], 0.05)
    stars = fit_standards(exposure, fitted["catalog"], fitted["setup"])
    assert list(stars["status"].values) == ["ok"]
    with pytest.warns(FluxCalWarning, match="one usable standard star"):
        comb = combine_vectors(stars)
    assert comb.attrs["fcalnstr"] == 1
    assert comb.attrs["fcalqual"] == "C"
    assert comb.attrs["fcalmerr"] == pytest.approx(0.05, rel=0.3)


def _single_standard(fitted, tmp_path, mag_offset):
    """The fixture exposure with one standard left, its photometry ``mag_offset`` too faint."""
    exposure = fitted["exposure"].copy(deep=True)
    std = list(fitted["stars"]["fiber"].values)
    types = exposure["fiber_type"].values.copy()
    types[std[1:]] = "P"
    exposure = exposure.assign_coords(fiber_type=("fiber", types))
    rows = [dict(r) for r in fitted["rows"]]
    (row,) = [r for r in rows if r["_fiber"] == std[0]]
    for col in ("Gaia", "BP", "RP", "g", "r", "i", "z", "J", "H", "K"):
        if row[col] != "99.999":
            row[col] = f"{float(row[col]) + mag_offset:.3f}"
    path = tmp_path / f"c{mag_offset:+.1f}.csv"
    write_catalog(path, rows)
    return exposure, read_catalog(path)


def test_photometry_of_another_star_is_refused_by_the_implied_throughput(fitted, tmp_path):
    """The only standard's magnitudes 10 mag too faint: its counts would need 10^4 times the
    instrument's throughput. Refused with that reason, not calibrated 10^-4 too low."""
    exposure, catalog = _single_standard(fitted, tmp_path, 10.0)
    stars = fit_standards(exposure, catalog, fitted["setup"])
    (status,) = stars["status"].values
    assert stars["throughput"].values[0] > 1000  # 10^4 x a plausible ~0.15
    assert re.match(r"implied throughput [\d.e+]+ is impossible for the instrument "
                    r"\(0\.02-0\.6, x/ 3\): photometry of another star\?", status), status
    with pytest.raises(CalibrationError, match="implied throughput"):
        combine_vectors(stars)


def test_implausible_but_possible_throughput_calibrates_with_grade_d(fitted, tmp_path):
    """2 mag too faint: a throughput of ~1, outside 0.02-0.6 but within the margin (x3):
    calibrated, flagged, grade D."""
    exposure, catalog = _single_standard(fitted, tmp_path, 2.0)
    stars = fit_standards(exposure, catalog, fitted["setup"])
    assert list(stars["status"].values) == ["ok"]
    assert 0.6 < stars["throughput"].values[0] < 1.8
    assert "implied throughput" in stars["flags"].values[0]
    with pytest.warns(FluxCalWarning, match="one usable standard star"):
        comb = combine_vectors(stars)
    assert comb.attrs["fcalqual"] == "D"
    # Without the error, the same star gives a plausible throughput and a better grade.
    exposure, catalog = _single_standard(fitted, tmp_path, 0.0)
    plain = fit_standards(exposure, catalog, fitted["setup"])
    assert 0.02 < plain["throughput"].values[0] < 0.6 and plain["flags"].values[0] == \
        plain["flags"].values[0].replace("implied throughput", "")


def test_stars_broader_than_the_header_give_the_fitted_line_spread(world, tmp_path):
    """Stars 3 % broader than FWHMPCk says (focus, pixel response): the fitted width
    correction is within 1 % of 1.03, and the templates are convolved with it."""
    exposure, catalog, _, _ = _exposure(world, 31, tmp_path, snr=(80, 150), lsf_scale=1.03)
    stars = fit_standards(exposure, catalog, template_library(world["grid"], exposure),
                          SELF_MODEL)
    assert stars.attrs["lsf_scale"] == pytest.approx(1.03, abs=0.01)
    assert stars.attrs["lsf_fwhm_coeffs"] == pytest.approx(
        [c * stars.attrs["lsf_scale"] for c in exposure.attrs["lsf_fwhm_coeffs"]])
    (tmp_path / "plain").mkdir()
    plain, _, _, _ = _exposure(world, 31, tmp_path / "plain", snr=(80, 150))
    again = fit_standards(plain, catalog, template_library(world["grid"], plain), SELF_MODEL)
    assert again.attrs["lsf_scale"] == pytest.approx(1.0, abs=0.01)



def test_a_line_spread_width_the_stars_do_not_constrain_stays_the_headers():
    """Templates coarser than the line spread are only interpolated: the trial widths give
    nearly the same chi^2, the parabola's vertex is noise (on CALSPEC stars with CK04
    templates it moved from +25 % to +5 % with a 1e-7 change of the counts) and its error
    huge. The prior keeps such a width at the header's; well-measured widths pass."""
    from kspec_fluxcal.fit.line_spread import pool_lsf_scales

    loose = pool_lsf_scales(np.array([0.247, 0.20]), np.array([5e5, 2e5]), 0.05)
    assert loose[0] == pytest.approx(1.0, abs=1e-9) and loose[1] == pytest.approx(0.05, rel=1e-6)
    tight = pool_lsf_scales(np.array([0.030, 0.034]), np.array([0.002, 0.002]), 0.05)
    assert tight[0] == pytest.approx(1.032, abs=0.0005) and tight[1] < 0.0015
    assert pool_lsf_scales(np.array([0.03]), np.array([0.002]), None)[0] == pytest.approx(1.03)


def test_lines_deeper_than_the_templates_weigh_less(fitted):
    """One standard's lines 30 % deeper than its model's: its fitted line mismatch grows
    several times beyond the others' (made by the templates' physics: < 0.1), though to less
    than 0.3, since the fit absorbs part of it in the parameters (the reason for
    ``line_error_scale`` 2); its vector's variance in the lines grows with it, so its lines
    weigh less in the combination. The floor keeps every star's lines uncertain."""
    s, fiber = 0, int(fitted["stars"]["fiber"].values[0])
    config = SELF_MODEL.replace(line_error_floor=0.0)
    stars = fit_standards(fitted["exposure"], fitted["catalog"], fitted["setup"], config)
    exposure = fitted["exposure"].copy(deep=True)
    wave = stars["star_wavelength"].values[s] if "star_wavelength" in stars.coords else (
        stars["wavelength"].values)
    depth = np.clip(1.0 - np.nan_to_num(stars["model_norm"].values[s], nan=1.0), 0.0, None)
    fiber_wave = exposure["wavelength"].values if exposure["wavelength"].ndim == 1 else (
        exposure["wavelength"].values[fiber])
    exposure["flux"].values[fiber] *= 1.0 - 0.3 * np.interp(fiber_wave, wave, depth)
    deeper = fit_standards(exposure, fitted["catalog"], fitted["setup"], config)
    k_before, k_after = stars["line_error"].values, deeper["line_error"].values
    assert np.all(k_before < 0.1) and np.all(k_after[1:] < 0.1)
    assert 0.1 < k_after[s] < 0.3 and k_after[s] > 2.5 * k_before.max()

    def line_variance(ds):
        return np.nanmedian((ds["cal_variance"].values[s] / ds["cal"].values[s] ** 2)[lines])

    lines = depth > 0.2
    assert line_variance(deeper) > 4 * line_variance(stars)
    # The default floor: a line of depth d carries at least (0.75 d)^2.
    floor = fitted["stars"]
    assert line_variance(floor) > (0.75 * 0.2) ** 2 > 10 * line_variance(stars)


def test_line_depth_is_one_minus_the_model_at_least_0_and_0_without_a_model():
    from kspec_fluxcal.fit.acceptance import line_depth

    model = np.array([[0.25, 1.0, 1.5, np.nan], [np.nan, 0.0, 0.999, -2.0]])
    np.testing.assert_array_equal(line_depth(model), [[0.75, 0.0, 0.0, 0.0],
                                                      [0.0, 1.0, 1.0 - 0.999, 3.0]])
    rng = np.random.default_rng(2)
    model = rng.normal(1.0, 0.3, (3, 500))
    model[rng.random(model.shape) < 0.1] = np.nan
    expected = np.clip(1.0 - np.nan_to_num(model, nan=1.0), 0.0, None)
    assert line_depth(model).tobytes() == expected.tobytes()


def test_masked_pixels_are_no_longer_good():
    """The outlier passes' masked pixels become bad; the rest, and every other variable and
    attr, are the standards' own."""
    from kspec_fluxcal.fit.standards import _without

    good = np.ones((2, 5), dtype=bool)
    good[1, 0] = False
    std = xr.Dataset({"flux": (("fiber", "wavelength"), np.ones((2, 5))),
                      "good": (("fiber", "wavelength"), good, {"description": "valid"})},
                     coords={"fiber": [3, 7], "wavelength": np.arange(5.0)}, attrs={"expid": "E"})
    masked = np.zeros((2, 5), dtype=bool)
    assert _without(std, masked) is std
    masked[0, 2] = masked[1, 4] = True
    out = _without(std, masked)
    np.testing.assert_array_equal(out["good"].values, good & ~masked)
    assert out["good"].attrs == {"description": "valid"} and out.attrs == {"expid": "E"}
    assert std["good"].values.sum() == 9  # the input untouched
    xr.testing.assert_identical(out.drop_vars("good"), std.drop_vars("good"))


def test_the_standards_rows_are_the_exposures_selection():
    """Issue 14: the standards' rows, built from the exposure's variables, are its selection
    (values, order, indexes, attrs; in memory and lazy; without per-fiber wavelengths and
    with a data variable more), for any fibers."""
    from kspec_fluxcal.fit.standards import _standard_rows

    rng = np.random.default_rng(2)
    wave = np.linspace(4000.0, 5000.0, 9)
    exposure = xr.Dataset(
        {"flux": (("fiber", "wavelength"), rng.normal(size=(5, 9)).astype(np.float32),
                  {"units": "count"}),
         "variance": (("fiber", "wavelength"), rng.uniform(1, 2, (5, 9)).astype(np.float32)),
         "good": (("fiber", "wavelength"), rng.random((5, 9)) > 0.1),
         "sky": (("fiber", "wavelength"), np.zeros((5, 9)))},
        coords={"fiber": np.arange(5), "wavelength": ("wavelength", wave, {"units": "A"}),
                "fiber_wavelength": (("fiber", "wavelength"), wave + rng.normal(size=(5, 9))),
                "fiber_name": ("fiber", [f"f{i}" for i in range(5)])},
        attrs={"expid": "E1"})
    for ds in (exposure, exposure.drop_vars("fiber_wavelength"),
               exposure.chunk({"wavelength": -1})):
        for fibers in ([3, 1], [4], [], [0, 1, 2, 3, 4]):
            want = ds.isel(fiber=fibers)[["flux", "variance", "good"]]
            got = _standard_rows(ds, np.array(fibers, dtype=int))
            assert (got["flux"].chunks is None) == (ds["flux"].chunks is None)
            xr.testing.assert_identical(got.compute(), want.compute())
            assert list(got.variables) == list(want.variables)
            assert got.xindexes["fiber"].equals(want.xindexes["fiber"])
            assert type(got.variables["fiber"]) is type(want.variables["fiber"])
