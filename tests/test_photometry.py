import numpy as np
import pytest
import speclite.filters
import xarray as xr

from kspec_fluxcal.constants import AB_REFERENCE_FNU, BANDS, SPEED_OF_LIGHT_AAS
from kspec_fluxcal.photometry import (
    ab_to_flam,
    ab_to_fnu,
    band_weights,
    colour_teff_table,
    flam_to_ab,
    fnu_to_ab,
    load_band,
    logg_from_parallax,
    parallax_chi2,
    synthetic_mag,
    teff_from_color,
)


def _spectra(n=3, npix=40000, lo=2500.0, hi=26000.0, seed=1):
    rng = np.random.default_rng(seed)
    wave = np.geomspace(lo, hi, npix)
    temps = rng.uniform(4500, 9000, n)[:, None]
    x = 1.4388e8 / (wave[None, :] * temps)
    flux = 1e-2 / wave**5 / np.expm1(x) * (1 - 0.3 * np.exp(-0.5 * ((wave - 6563) / 5) ** 2))
    return xr.DataArray(flux, dims=("star", "wavelength"), coords={"wavelength": wave})


def test_matches_speclite():
    spectra = _spectra()
    ours = synthetic_mag(spectra, BANDS, medium="vacuum")
    assert ours.dims == ("star", "band")
    for band in BANDS:
        ref = speclite.filters.load_filter(band).get_ab_magnitude(spectra.values,
                                                                  spectra["wavelength"].values)
        np.testing.assert_allclose(ours.sel(band=band).values, ref, atol=1e-10)


def test_matches_speclite_on_coarse_grid():
    # 20 A steps undersample the 2.5 A filter tables: speclite then interpolates.
    spectra = _spectra(npix=1200)
    wave = np.arange(2500.0, 26000.0, 20.0)
    coarse = spectra.interp(wavelength=wave)
    ref = speclite.filters.load_filter("gaiadr2-G").get_ab_magnitude(coarse.values, wave)
    np.testing.assert_allclose(synthetic_mag(coarse, "gaiadr2-G", medium="vacuum").values, ref,
                               atol=1e-10)


def test_flat_fnu_is_zero_mag():
    wave = np.geomspace(2500.0, 26000.0, 30000)
    flat = xr.DataArray(AB_REFERENCE_FNU * SPEED_OF_LIGHT_AAS / wave**2 * 10 ** (-0.4 * 17.3),
                        dims="wavelength", coords={"wavelength": wave})
    # Exact up to the trapezoid rule on a curved 1/lambda^2 (< 5e-5 mag here).
    np.testing.assert_allclose(synthetic_mag(flat, BANDS, medium="vacuum").values, 17.3, atol=5e-5)


def test_air_wavelengths_shift_to_vacuum():
    spectra = _spectra(n=1)
    air = synthetic_mag(spectra, "panstarrs-r", medium="air")
    vac = synthetic_mag(spectra, "panstarrs-r", medium="vacuum")
    # Same numbers read as air sit ~1.7 A redder in vacuum: a small but non-zero change.
    assert 1e-5 < abs((air - vac).item()) < 5e-3


def test_nan_when_not_covered_or_nan_inside():
    spectra = _spectra(n=2, lo=3500, hi=9500)
    mags = synthetic_mag(spectra, ["panstarrs-r", "twomass-J"])
    assert np.isfinite(mags.sel(band="panstarrs-r")).all()
    assert np.isnan(mags.sel(band="twomass-J")).all()
    holes = spectra.copy()
    holes[0, np.argmin(abs(holes["wavelength"].values - 6200))] = np.nan
    holes[1, 0] = np.nan  # outside the r band: harmless
    mags = synthetic_mag(holes, "panstarrs-r")
    assert np.isnan(mags[0]) and np.isfinite(mags[1])


def test_finite_spectra_give_the_general_paths_magnitudes():
    """Spectra without NaN (contiguous: the shortcut without the NaN product) have the
    magnitudes of the same spectra taken by the general path (a NaN outside every band, or
    another memory layout): not covered NaN, a flux that is not positive NaN."""
    from kspec_fluxcal.photometry import band_weight_values, synthetic_mag_values

    spectra = _spectra(n=3, lo=3500, hi=9500)
    wave = spectra["wavelength"].values
    flux = spectra.values.copy()
    flux[2] *= -1.0
    weights = band_weight_values(["panstarrs-g", "panstarrs-r", "twomass-J"], wave)
    fast = synthetic_mag_values(flux, weights)
    holes = flux.copy()
    holes[:, 0] = np.nan  # at 3500 A: in none of the bands
    np.testing.assert_allclose(fast, synthetic_mag_values(holes, weights), rtol=1e-13)
    np.testing.assert_allclose(fast, synthetic_mag_values(np.asfortranarray(flux), weights),
                               rtol=1e-13)
    assert np.isfinite(fast[:2, :2]).all() and np.isnan(fast[:, 2]).all()
    assert np.isnan(fast[2]).all()


def test_lazy_and_same_as_eager(raise_if_computes):
    spectra = _spectra(n=4)
    lazy = spectra.chunk({"star": 2})
    with raise_if_computes():
        out = synthetic_mag(lazy, BANDS)
    assert out.chunks is not None
    xr.testing.assert_allclose(out.compute(), synthetic_mag(spectra, BANDS))


def test_band_weights_cached_and_labelled():
    wave = np.linspace(2900, 11500, 5000)
    w = band_weights(["gaiadr2-G", "twomass-Ks"], wave)
    assert w.dims == ("band", "wavelength")
    assert np.isnan(w.sel(band="twomass-Ks")).all()
    assert (w.sel(band="gaiadr2-G") >= 0).all()


@pytest.mark.parametrize("medium", ["air", "vacuum"])
def test_band_weight_values_are_each_bands_own(medium):
    """The array of band_weight_values is band_weights' values, and each band's row (the
    grid's vacuum wavelengths shared by its bands) what the band alone gets on a new grid."""
    from kspec_fluxcal.photometry import _vacuum_grid, _weights_cached, band_weight_values

    wave = np.linspace(3500.0, 9000.0, 3000)
    bands = ["panstarrs-g", "panstarrs-r", "twomass-Ks"]
    values = band_weight_values(bands, wave, medium)
    np.testing.assert_array_equal(values, band_weights(bands, wave, medium).values)
    for k, band in enumerate(bands):
        _vacuum_grid.cache_clear()
        _weights_cached.cache_clear()
        np.testing.assert_array_equal(values[k], band_weight_values(band, wave, medium)[0])
    assert np.isnan(values[2]).all() and (values[0] >= 0).all()


def test_unit_conversions_roundtrip():
    mag, err = np.array([10.0, 20.0]), np.array([0.01, 0.1])
    fnu, fnu_err = ab_to_fnu(mag, err)
    assert fnu[0] == pytest.approx(3631e-23 * 1e-4)
    back, back_err = fnu_to_ab(fnu, fnu_err)
    np.testing.assert_allclose(back, mag)
    np.testing.assert_allclose(back_err, err)
    flam, flam_err = ab_to_flam(mag, 5000.0, err)
    assert flam[0] == pytest.approx(fnu[0] * 2.99792458e18 / 5000.0**2)
    np.testing.assert_allclose(flam_to_ab(flam, 5000.0), mag)
    np.testing.assert_allclose(flam_err / flam, err * np.log(10) / 2.5)


def test_teff_from_colour():
    table = colour_teff_table()
    bands = ["gaiadr2-BP", "gaiadr2-RP", "panstarrs-g", "panstarrs-r"]
    # Star 0 has the table's 6000 K colours; star 1 only g-r of 5000 K; star 2 nothing.
    mag = xr.DataArray(np.full((3, 4), np.nan), dims=("star", "band"), coords={"band": bands})
    mag[0, 0], mag[0, 1] = 15.0 + float(table["bp_rp"].sel(teff=6000)), 15.0
    mag[1, 2], mag[1, 3] = 15.0 + float(table["g_r"].sel(teff=5000)), 15.0
    est = teff_from_color(mag, window=500)
    np.testing.assert_allclose(est["teff"].values[:2], [6000, 5000], atol=1)
    assert np.isnan(est["teff"].values[2])
    assert list(est["teff_method"].values) == ["bp_rp", "g_r", "none"]
    assert est["teff_max"].values[0] - est["teff_min"].values[0] == 1000
    # Reddening makes colours redder: removing it raises the estimate.
    assert float(teff_from_color(mag, ebv=0.1)["teff"][0]) > 6100


@pytest.mark.parametrize("band", BANDS)
def test_band_tables_read_as_speclite_reads_them(band):
    # Our reader of speclite's tables (no astropy.table / scipy.interpolate import).
    ours, ref = load_band(band), speclite.filters.load_filter(band)
    np.testing.assert_allclose(ours.wavelength, ref._wavelength, rtol=1e-15)
    np.testing.assert_array_equal(ours.response, ref.response)
    assert ours.effective_wavelength == pytest.approx(
        ref.effective_wavelength.to_value("Angstrom"), rel=1e-13)
    assert ours.ab_zeropoint == pytest.approx(ref.ab_zeropoint.value, rel=1e-13)
    wave = np.linspace(ref._wavelength[0] - 50.0, ref._wavelength[-1] + 50.0, 2001)
    np.testing.assert_allclose(ours(wave), ref(wave), rtol=0, atol=1e-12)


def test_unknown_band_is_named():
    for name in ("sdss-q", "../filters/gaiadr2-G"):
        with pytest.raises(ValueError, match="unknown band"):
            load_band(name)


def test_parallax_chi2_tells_dwarfs_from_giants_at_low_parallax_snr():
    """A dwarf (log g 4.4, 1 Msun, R ~ 1 Rsun) at 2 kpc: parallax 0.5 mas. Its scale and
    log g imply that parallax (chi^2 ~ 0); a giant of the same scale (log g 2.4, 10 x the
    radius, ten times as far) implies 0.05 mas. With a parallax error of 0.2 mas (S/N 2.5,
    where the inverse parallax is no distance) the giant is still disfavoured (chi^2 ~ 5),
    and a missing parallax adds nothing."""
    from kspec_fluxcal.constants import GAIA_DR2_PARALLAX_ZERO_POINT, GM_SUN, PARSEC

    radius = np.sqrt(GM_SUN / 10.0**4.4)
    distance = 2000.0 * PARSEC
    scale = (radius / distance) ** 2
    catalog = 0.5 + GAIA_DR2_PARALLAX_ZERO_POINT
    chi2 = parallax_chi2(scale, np.array([4.4, 2.4]), catalog, 0.2)
    assert chi2[0] < 1e-6
    assert chi2[1] == pytest.approx((0.5 - 0.05) ** 2 / (0.2**2 + (0.15 * 0.05) ** 2),
                                    rel=1e-3)
    assert logg_from_parallax(scale, catalog, 0.2)[0] != logg_from_parallax(scale, catalog,
                                                                             0.2)[0]  # NaN
    assert np.all(parallax_chi2(scale, np.array([4.4, 2.4]), np.nan, 0.2) == 0.0)
    # At high S/N the two agree: one sigma in log g, either way, costs chi^2 ~ 1.
    logg, logg_err = logg_from_parallax(scale, catalog, 0.005)
    both = parallax_chi2(scale, logg + np.array([-1.0, 1.0]) * logg_err, catalog, 0.005)
    assert both.mean() == pytest.approx(1.0, rel=0.1)
