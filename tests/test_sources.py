"""Star sources of the simulator (grid, model families, CALSPEC, CK04) and a cross-model
calibration: standards of one model family fitted with templates of the other."""

import json
import warnings

import numpy as np
import pytest
from astropy.io import fits
from conftest import SHARED_REAL, requires_shared

from kspec_fluxcal.constants import STEFAN_BOLTZMANN
from kspec_fluxcal.errors import FluxCalWarning, GridError, InputError
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.grid.build import build_grid, read_bosz_spectrum, scan_bosz
from kspec_fluxcal.pipeline import calibrate_exposure
from kspec_fluxcal.reddening import extinction_per_ebv
from kspec_fluxcal.sim import (
    ISOPLANE_SETUP,
    CalspecStars,
    GridNodes,
    GridStars,
    ModelStars,
    Setup,
    compare_with_truth,
    convert_ck04,
    read_ck04_file,
    simulate_exposure,
    simulate_survey,
    synthetic_spectrum,
    write_catalog,
)
from kspec_fluxcal.templates import prepare_templates
from kspec_fluxcal.wavelength import vacuum_to_air

SETUP = Setup("xm", pixels=1024, fibers=8)
#: Model-B standards inside the small grid (Teff 5500-7500, log g 4.0-4.5, [M/H] -0.5-0).
INSIDE_SMALL_GRID = {"teff": (5700.0, 7200.0), "logg": (4.05, 4.45), "feh": (-0.45, -0.05),
                     "alpha": (0.0, 0.0)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_grid):
    return {"root": tmp_path_factory.mktemp("sources"), "bosz": small_grid,
            "stars": GridStars(small_grid)}


# ----------------------------------------------------------------------------- model stars


def test_model_stars_are_the_model_at_their_parameters(world):
    source = ModelStars("B", resolution=5000, wave_range=(3000.0, 26000.0),
                        ranges={"alpha": (0.3, 0.5)},
                        nodes={"teff": [5500, 6000, 6500], "feh": [-0.5, -0.25, 0.0]},
                        node_distance=0.3)
    drawn = source.sample(np.random.default_rng(3), 5)
    assert np.all((drawn["alpha"] >= 0.3) & (drawn["alpha"] <= 0.5))  # beyond a +0.25 grid
    for name, nodes in (("teff", [5500, 6000, 6500]), ("feh", [-0.5, -0.25, 0.0])):
        step = np.gradient(nodes)[0]
        assert np.min(np.abs(drawn[name][:, None] - np.asarray(nodes)[None, :])) > 0.3 * step
    spectra = source.spectra(drawn)
    direct = synthetic_spectrum(source.wavelength, drawn["teff"][0], drawn["logg"][0],
                                drawn["feh"][0], drawn["alpha"][0], resolution=5000,
                                family="B")[0]
    np.testing.assert_array_equal(spectra[0], direct)
    computed = source.computed
    source.spectra(drawn)
    assert source.computed == computed  # cached
    family_a = synthetic_spectrum(source.wavelength, drawn["teff"][0], drawn["logg"][0],
                                  drawn["feh"][0], drawn["alpha"][0], resolution=5000)[0]
    optical = (source.wavelength > 4000) & (source.wavelength < 8400)
    ratio = spectra[0][optical] / family_a[optical]
    assert 0.01 < np.std(ratio) < 0.2  # another model, not another star


def test_standards_from_another_family_have_their_truth(world):
    source = ModelStars("B", ranges=INSIDE_SMALL_GRID)
    sim = simulate_exposure(5, world["stars"], setup=SETUP, n_standards=2,
                            standard_source=source)
    t = sim.truth
    assert list(t["std_source"]) == ["model:B", "model:B"]
    assert str(t["field_source"]) == "grid:synthetic"
    assert np.all((t["std_teff"] >= 5700) & (t["std_teff"] <= 7200))
    np.testing.assert_array_equal(t["std_rv"], t["std_rv_extra"])
    np.testing.assert_array_equal(t["std_ebv"], t["std_ebv_extra"])
    # The truth on the pixels is the source's spectrum, diluted: its photometry is std_mag.
    assert np.all(np.isfinite(t["std_mag"])) and np.all(t["true_flux"][t["std_fiber"]] > 0)


#: The small grid's box: model stars beyond it leave it in at least one parameter.
SMALL_GRID_BOX = {"teff": (5500.0, 7500.0), "logg": (4.0, 4.5), "feh": (-0.5, 0.0)}


def test_model_stars_beyond_a_grid_leave_its_box_whatever_the_simulator_asks(world):
    """Stars beyond a template grid's edges: the simulator's standard-star ranges (inside a
    demo-like grid) would clip them back inside, so a source with ``beyond`` ignores them."""
    source = ModelStars("B", resolution=5000, ranges={"teff": (5000.0, 8000.0),
                                                      "logg": (3.7, 4.8), "feh": (-0.8, 0.3)},
                        beyond=SMALL_GRID_BOX)
    asked = {"teff": (5500.0, 7000.0), "logg": (3.8, 4.6), "feh": (-0.9, 0.2)}
    drawn = source.sample(np.random.default_rng(4), 40, asked)
    outside = np.any([(drawn[p] < lo) | (drawn[p] > hi)
                      for p, (lo, hi) in SMALL_GRID_BOX.items()], axis=0)
    assert outside.all()
    assert np.any(drawn["teff"] < 5500.0) and np.any(drawn["teff"] > 7000.0)  # not clipped
    assert source.describe()["beyond"]["teff"] == [5500.0, 7500.0]
    sim = simulate_exposure(6, world["stars"], setup=SETUP, n_standards=3,
                            standard_source=source)
    t = sim.truth
    assert np.all(np.any([(t["std_" + p] < lo) | (t["std_" + p] > hi)
                          for p, (lo, hi) in SMALL_GRID_BOX.items()], axis=0))
    assert np.all(t["true_flux"][t["std_fiber"]] > 0)


@pytest.mark.parametrize("beyond", [{"Teff": (5000.0, 6000.0)}, {"teff": (5000.0,)},
                                    {"logg": (4.5, 4.0)}])
def test_model_stars_beyond_a_bad_box_is_refused_at_once(beyond):
    """A misspelt parameter or a box that is not (lo, hi) is refused when the source is made
    (it was a bare KeyError or an unpacking error deep in the simulator)."""
    with pytest.raises(ValueError, match=r"beyond\["):
        ModelStars("B", resolution=5000, beyond=beyond)


def test_grid_nodes_draw_every_point_before_repeating_one(world):
    """A source of a grid's own points draws each before any twice (choice with replacement
    could give one node three times and skip another), and names them in full."""
    source = GridNodes(world["bosz"])
    total = int(source.exists.sum())
    drawn = source.sample(np.random.default_rng(1), total + 2)
    points = {tuple(drawn[p][k] for p in ("teff", "logg", "feh", "alpha"))
              for k in range(total)}
    assert len(points) == total  # the first `total` draws: every point once
    assert all(name.count(" a") == 1 for name in drawn["name"])  # [alpha/M] named too
    assert len(set(drawn["name"][:total])) == total


def test_a_source_short_of_gaia_g_is_a_grid_error(world):
    """A model source from 3000 A (air) misses the blue end of Gaia G (3000 A in vacuum), by
    which every star is scaled: its standards' spectra were NaN and the noise draw failed
    with numpy's bare "lam value too large"."""
    source = ModelStars("B", resolution=5000, wave_range=(3000.0, 26000.0))
    with pytest.raises(GridError, match=r"3000-26000 A \(air\), not the whole Gaia G"):
        simulate_exposure(6, world["stars"], setup=SETUP, n_standards=2,
                          standard_source=source)


# ----------------------------------------------------------------------------- parallaxes


def test_parallaxes_follow_mass_gravity_and_dilution(world):
    from kspec_fluxcal.constants import GM_SUN, PARSEC, R_SUN

    sim = simulate_exposure(9, world["stars"], setup=SETUP, n_standards=3)
    t = sim.truth
    distance_cm = 1000.0 / t["std_plx"] * PARSEC
    radius = np.sqrt(t["std_dilution"]) * distance_cm / R_SUN
    np.testing.assert_allclose(radius, t["std_radius"], rtol=1e-10)
    np.testing.assert_allclose(radius, np.sqrt(GM_SUN * t["std_mass"] / 10 ** t["std_logg"])
                               / R_SUN, rtol=1e-10)
    assert np.all((t["std_mass"] >= 0.75) & (t["std_mass"] <= 1.3))
    assert np.all((t["std_plx"] > 0.05) & (t["std_plx"] < 5.0))  # G 13.5-16.5 dwarfs
    rows = {int(r["objid"]): r for r in sim.catalog}
    for objid, plx in zip(t["std_objid"], t["std_plx"], strict=True):
        row = rows[int(objid)]
        dplx = float(row["dplx"])
        assert 0.02 < dplx < 0.15  # Gaia DR2 at G 13.5-16.5
        # catalog = true + DR2 zero point (-0.029 mas) + noise of dplx (3 decimals written)
        assert abs(float(row["plx"]) - (plx - 0.029)) < 5 * dplx + 1e-3
    decoys = [r for r in sim.catalog if r["_role"] == "decoy"]
    assert all(0.0 < float(r["plx"]) + 5 * float(r["dplx"]) for r in decoys)


# ----------------------------------------------------------------------------- cross-model


@pytest.fixture(scope="module")
def cube(world):
    return open_grid(build_grid(world["bosz"], world["root"] / "grid.zarr", progress=False))


def test_cross_model_standards_calibrate_with_a_visible_mismatch(world, cube, tmp_path):
    """Family-B standards, family-A templates, default settings: every standard is used (the
    mismatch is a quality figure, not a reason to reject), the calibration stays within 2 %
    in shape while the fits show the template mismatch."""
    source = ModelStars("B", ranges=INSIDE_SMALL_GRID)
    sim = simulate_exposure(1, world["stars"], setup=SETUP, n_standards=3,
                            standard_source=source, snr_range=(60.0, 150.0))
    red = tmp_path / "red.fits"
    sim.hdulist.writeto(red)
    write_catalog(tmp_path / "cat.csv", sim.catalog)
    result = calibrate_exposure(red, tmp_path / "cat.csv", cube, out=tmp_path / "out")
    metrics = compare_with_truth(result.path, sim.truth)
    assert metrics["n_standards"] == 3
    assert metrics["cal_shape"] < 0.02
    assert abs(metrics["level_cal"]) < 0.03
    chi2 = result.stars["chi2_dof"].values
    assert np.median(chi2) > 2.0  # a model of one family is no perfect fit to the other
    assert np.all(result.stars["model_error"].values > 0.005)
    assert list(result.stars["status"].values) == ["ok"] * 3
    assert {s["source"] for s in metrics["stars"]} == {"model:B"}


def test_a_star_source_coarser_than_the_instrument_is_named_once_per_survey(world, tmp_path):
    """Standards whose source is coarser than the line spread are only sampled (their lines
    broader than the header says): simulate_exposure warns, a survey warns once with the
    number of exposures, and the manifest records each exposure's fraction; a source
    sharper than the instrument raises no such warning."""
    coarse = ModelStars("B", resolution=400, ranges=INSIDE_SMALL_GRID)
    with pytest.warns(FluxCalWarning, match=r"the star source model:B is coarser than the "
                      r"instrument's line spread on \d+% of the pixels") as caught:
        sim = simulate_exposure(1, world["stars"], setup=SETUP, n_standards=1,
                                standard_source=coarse)
    sharper = float(sim.truth["source_sharper"])
    assert sharper > 0.5 and len(caught) == 1
    assert f" on {100 * sharper:.0f}% of the pixels" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FluxCalWarning)
        sharp = simulate_exposure(1, world["stars"], setup=SETUP, n_standards=1)
    assert float(sharp.truth["source_sharper"]) == 0.0
    with pytest.warns(FluxCalWarning, match="model:B is coarser") as caught:
        out = simulate_survey(tmp_path / "sv", exposures=3, nights=1, seed=2,
                              grid=world["bosz"], setups=[SETUP], standard_source=coarse,
                              n_standards=(1, 1), workers=1)
    assert [str(w.message).endswith("(on 3 of 3 exposures)") for w in caught] == [True]
    manifest = json.loads((out / "survey.json").read_text())
    assert all(e["source_sharper"] > 0.5 for e in manifest["exposures"])


# ----------------------------------------------------------------------------- CK04


@pytest.fixture(scope="module")
def ck04(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck04")
    bosz = convert_ck04(SHARED_REAL / "ck04", root / "bosz", teff_range=(5750, 6250),
                        loggs=(4.0, 4.5), fehs=(-0.5, 0.0))
    return root, bosz


@requires_shared
def test_ck04_overwrite_replaces_a_converted_grid_only(ck04, tmp_path):
    """overwrite=True replaced any directory (a mistyped path lost the user's files)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(GridError, match="mine: exists and is not a converted CK04 grid"):
        convert_ck04(SHARED_REAL / "ck04", mine, teff_range=(5750, 6250), loggs=(4.0,),
                     fehs=(0.0,), overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"
    again = convert_ck04(SHARED_REAL / "ck04", ck04[1], teff_range=(5750, 6250),
                         loggs=(4.0, 4.5), fehs=(-0.5, 0.0), overwrite=True)
    assert (again / "CK04_GRID.txt").is_file()


@requires_shared
def test_ck04_converts_to_a_bosz_layout_the_pipeline_opens(ck04):
    root, bosz = ck04
    scan = scan_bosz(bosz)
    assert scan["resolution"] == "r500" and len(scan["models"]) == 3 * 2 * 2
    assert {m["atmos"] for m in scan["models"]} == {"ap"}
    model = read_ck04_file(SHARED_REAL / "ck04" / "ckm05" / "ckm05_6000.fits")
    wave = np.loadtxt(scan["wave_file"])
    np.testing.assert_allclose(wave, vacuum_to_air(model["wavelength"]), rtol=1e-7)
    assert wave[np.searchsorted(wave, 6000.0)] != model["wavelength"][np.searchsorted(wave, 6000)]
    path = next(m["path"] for m in scan["models"] if (m["teff"], m["logg"], m["feh"])
                == (6000.0, 4.5, -0.5))
    flux, cont = read_bosz_spectrum(path, wave.size)
    lit = flux > 0  # BOSZ writes "0 1" where the flux is negligible (the far UV)
    assert lit[wave > 2000].all()
    np.testing.assert_array_equal(flux[lit], cont[lit])  # the documented continuum stand-in
    for k in np.searchsorted(wave, [4000.0, 5500.0, 8000.0]):
        assert flux[k] == pytest.approx(model["flux"][4.5][k], rel=1e-4)  # F = 4 pi H
    assert np.trapezoid(flux, model["wavelength"]) == pytest.approx(
        STEFAN_BOLTZMANN * 6000.0**4, rel=0.01)
    grid = open_grid(build_grid(bosz, root / "ck04.zarr", progress=False))
    assert grid.attrs["resolving_power"] == 500.0 and "Castelli" in grid.attrs["title"]
    assert "convert_ck04" in grid.attrs["conversion"]  # the converter's notes travel along
    on_cube = grid["flux"].sel(teff=6000.0, logg=4.5, feh=-0.5, alpha=0.0)
    k = int(np.searchsorted(grid["wavelength"].values, 5500.0))
    assert float(on_cube[k]) == pytest.approx(np.interp(grid["wavelength"].values[k], wave, flux),
                                              rel=1e-6)
    with pytest.warns(FluxCalWarning, match="sharper than the grid"):
        prepared = prepare_templates(grid, ISOPLANE_SETUP.wavelength, ISOPLANE_SETUP.lsf)
    assert np.isfinite(prepared["flux"].sel(teff=6000.0, logg=4.5, feh=-0.5).values).all()


@requires_shared
def test_ck04_stars_are_sampled_where_the_instrument_is_sharper(world, ck04):
    _, bosz = ck04
    with pytest.warns(FluxCalWarning, match="the star source grid:ck04 is coarser"):
        sim = simulate_exposure(2, world["stars"], setup=ISOPLANE_SETUP,
                                wavelength_format="wcs", wavelength_unit="Angstroms",
                                n_standards=2, standard_source=GridStars(bosz))
    assert list(sim.truth["std_source"]) == ["grid:ck04"] * 2
    assert float(sim.truth["source_sharper"]) > 0.5
    assert np.all(np.isfinite(sim.truth["true_flux"][sim.truth["std_fiber"]]))


# ----------------------------------------------------------------------------- CALSPEC


@pytest.fixture(scope="module")
def calspec():
    return CalspecStars(SHARED_REAL / "calspec")


@requires_shared
def test_calspec_selection_and_surface_flux(calspec):
    assert "P330E" in calspec.names and "KF06T2" not in calspec.names  # K giant left out
    assert "BD+17 4708" not in calspec.names  # no reference Teff
    assert np.all((calspec.reference["teff"] >= 5000) & (calspec.reference["teff"] <= 7000))
    with fits.open(SHARED_REAL / "calspec" / "p330e_stiswfcnic_006.fits.gz") as hdul:
        raw = hdul[1].data
        wave, flux = np.asarray(raw["WAVELENGTH"], float), np.asarray(raw["FLUX"], float)
    k = int(np.flatnonzero(calspec.names == "P330E")[0])
    drawn = {"index": np.array([k])}
    spectrum = calspec.spectra(drawn)[0]
    # Observed shape kept (air wavelengths): the ratio to the file is one constant.
    at = vacuum_to_air(wave[(wave > 5000) & (wave < 8000)])
    ratio = np.interp(at, calspec.wavelength, spectrum) / flux[(wave > 5000) & (wave < 8000)]
    assert np.std(ratio) / np.mean(ratio) < 0.01
    # Dereddened, it integrates to sigma Teff^4 (the common grid stops at 3 um: ~1-2 % beyond).
    ebv, teff = calspec.reference["ebv"][k], calspec.reference["teff"][k]
    dered = spectrum * 10 ** (0.4 * ebv * extinction_per_ebv(calspec.wavelength))
    total = np.trapezoid(dered, calspec.wavelength) / (STEFAN_BOLTZMANN * teff**4)
    assert 0.96 < total < 1.0
    fwhm = calspec.native_fwhm(np.array([4500.0, 7000.0]))
    np.testing.assert_allclose(fwhm, [5.5, 9.8], atol=0.1)
    # KF06T2's FWHM column holds flux-like numbers: the STIS resolution stands in.
    giant = CalspecStars(SHARED_REAL / "calspec", names=["KF06T2"])
    np.testing.assert_allclose(giant.native_fwhm(np.array([4500.0, 7000.0])), [5.5, 9.8])
    with pytest.raises(InputError, match=r"without a reference Teff.*HD209458"):
        CalspecStars(SHARED_REAL / "calspec", names=["HD209458"])


@requires_shared
def test_calspec_standards_carry_their_reference_truth(world, calspec):
    sim = simulate_exposure(4, world["stars"], setup=ISOPLANE_SETUP, wavelength_format="wcs",
                            wavelength_unit="Angstroms", n_standards=3,
                            standard_source=calspec, snr_range=(20.0, 300.0))
    t = sim.truth
    assert list(t["std_source"]) == ["calspec"] * 3 and len(set(t["std_name"])) == 3
    for k, name in enumerate(t["std_name"]):
        row = int(np.flatnonzero(calspec.names == name)[0])
        assert t["std_teff"][k] == calspec.reference["teff"][row]
        assert t["std_ebv"][k] == pytest.approx(calspec.reference["ebv"][row]
                                                + t["std_ebv_extra"][k])
    assert np.all(np.isnan(t["std_rv"])) and np.all(np.isnan(t["std_alpha"]))
    assert np.all(np.isfinite(t["std_plx"])) and np.all(t["std_plx"] > 0)
    assert np.all((t["std_snr"] >= 20) & (t["std_snr"] <= 300))


@requires_shared
def test_a_grid_too_sparse_to_draw_from_is_a_grid_error():
    """The two real BOSZ 2024 files (two points of a 2 x 2 Teff-log g square) have no
    complete interpolation cell: drawing stars from them was a bare ValueError, a traceback
    in ``kspec-fluxcal simulate --grid``."""
    stars = GridStars(SHARED_REAL / "bosz2024_r5000")
    with pytest.raises(GridError, match="bosz2024_r5000: could not draw 2 off-grid stars"):
        stars.sample(np.random.default_rng(0), 2)


@requires_shared
def test_real_bosz_spectra_at_their_own_parameters_make_a_survey(world, tmp_path):
    """The two real BOSZ 2024 files as standards (GridNodes): a survey of them simulates,
    each standard exactly one file's spectrum at that file's parameters."""
    source = GridNodes(SHARED_REAL / "bosz2024_r5000")
    assert source.label == "nodes:bosz" and len(source._points) == 2
    drawn = source.sample(np.random.default_rng(0), 2, {"teff": (5500.0, 7000.0)})
    assert sorted(drawn["teff"]) == [4750.0, 6000.0]  # the simulator's ranges are ignored
    file = scan_bosz(SHARED_REAL / "bosz2024_r5000")["models"]
    t6000 = next(m for m in file if m["teff"] == 6000.0)
    np.testing.assert_array_equal(source.spectra({p: np.array([v]) for p, v in
                                                  (("teff", 6000.0), ("logg", 4.0),
                                                   ("feh", 0.0), ("alpha", 0.0))})[0],
                                  read_bosz_spectrum(t6000["path"],
                                                     source.wavelength.size)[0])
    out = simulate_survey(tmp_path / "sv", exposures=2, nights=1, seed=3, grid=world["bosz"],
                          setups=[ISOPLANE_SETUP], standard_source=source, n_standards=(2, 2),
                          workers=1)
    manifest = json.loads((out / "survey.json").read_text())
    assert manifest["options"]["standard_source"]["kind"] == "grid_nodes"
    for entry in manifest["exposures"]:
        t = np.load(out / entry["truth"])
        assert list(t["std_source"]) == ["nodes:bosz"] * 2
        assert sorted(zip(t["std_teff"], t["std_logg"], strict=True)) == [(4750.0, 4.5),
                                                                         (6000.0, 4.0)]
        assert sorted(t["std_name"]) == ["t4750 g4.5 m+0.00 a+0.00", "t6000 g4.0 m+0.00 a+0.00"]
        assert np.all(np.isfinite(t["true_flux"][t["std_fiber"]]))
