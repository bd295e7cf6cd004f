"""Tests of the synthetic BOSZ-layout grid: the stellar model and the file writer."""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from kspec_fluxcal import sim as sg
from kspec_fluxcal.errors import GridError
from kspec_fluxcal.sim import bosz_files as bosz
from kspec_fluxcal.sim import synthetic_grid

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
REAL_BOSZ = SHARED_REAL / "bosz2024_r5000"
REAL_T6000 = (
    REAL_BOSZ
    / "r5000"
    / "m+0.00"
    / "bosz2024_mp_t6000_g+4.0_m+0.00_a+0.00_c+0.00_v2_r5000_resam.txt.gz"
)
#: Tests against the real BOSZ 2024 files of ../shared/real (skipped when absent).
requires_real_bosz = pytest.mark.skipif(
    not REAL_T6000.exists(), reason="real BOSZ files in ../shared/real absent"
)

SIGMA_SB = 5.670374419e-5  # erg/s/cm2/K4 (CODATA 2018)

#: The file-name pattern of the formats contract, section 3.
NAME_RE = re.compile(
    r"^bosz2024_(?P<atmos>[a-z]{2})_t(?P<teff>\d+)_g(?P<logg>[+-]\d\.\d)_m(?P<feh>[+-]\d\.\d\d)"
    r"_a(?P<alpha>[+-]\d\.\d\d)_c(?P<carbon>[+-]\d\.\d\d)_v(?P<vmicro>\d+)_r(?P<r>\d+)"
    r"_resam\.txt\.gz$"
)
#: One row of a spectrum file: two '%.4e' numbers separated by one space.
ROW_RE = re.compile(rb"^\d\.\d{4}e[+-]\d\d \d\.\d{4}e[+-]\d\d$")

#: Wavelengths of the line tests: the BOSZ R=10000 grid over the optical.
WAVE_OPT = sg.bosz_wavelength_grid(10000, 3000.0, 10000.0)


@functools.lru_cache(maxsize=64)
def spectrum(teff, logg, feh, alpha=0.0):
    """R=10000 spectrum on WAVE_OPT (cached: each model costs ~0.1 s)."""
    flux, cont = sg.synthetic_spectrum(WAVE_OPT, teff, logg, feh, alpha, 10000)
    flux.setflags(write=False)
    cont.setflags(write=False)
    return flux, cont


def equivalent_width(flux, cont, centre, half_width):
    sel = np.abs(WAVE_OPT - centre) < half_width
    return float(np.trapezoid(1.0 - flux[sel] / cont[sel], WAVE_OPT[sel]))


def line_depth(flux, cont, centre, half_width=0.5):
    sel = np.abs(WAVE_OPT - centre) < half_width
    return float(1.0 - np.min(flux[sel] / cont[sel]))


# --------------------------------------------------------------------------------------------
# BOSZ wavelength grids and names
# --------------------------------------------------------------------------------------------


def test_wavelength_grid_r10000_is_bosz_like():
    wave = sg.bosz_wavelength_grid(10000)
    assert wave.size == 150000
    assert wave[0] == 500.0
    assert 319980.0 < wave[-1] < 320000.0
    dln = np.diff(np.log(wave))
    np.testing.assert_allclose(dln, math.log(640.0) / 150000, rtol=1e-9)
    # about 2.3 pixels per resolution element lambda / R
    assert 2.2 < 1.0 / (10000 * dln[0]) < 2.4


@pytest.mark.requires_shared
@requires_real_bosz
def test_wavelength_grid_equals_real_r5000():
    real = np.loadtxt(REAL_BOSZ / "bosz2024_wave_r5000.txt")
    ours = sg.bosz_wavelength_grid(5000)
    assert ours.size == real.size == 75000
    np.testing.assert_allclose(ours, real, rtol=2e-7)


def test_wavelength_grid_cut_to_range():
    wave = sg.bosz_wavelength_grid(5000, 2500.0, 26000.0)
    assert wave[0] >= 2500.0 and wave[-1] <= 26000.0
    full = sg.bosz_wavelength_grid(5000)
    assert np.isin(wave, full).all()


@pytest.mark.parametrize("bad", [0, 99, 50001, 5000.5, float("nan")])
def test_resolution_must_be_a_whole_number_in_range(bad):
    with pytest.raises(ValueError, match="resolution"):
        sg.bosz_wavelength_grid(bad)


def test_filename_matches_contract_pattern():
    name = sg.bosz_filename(6000, 4.0, -0.0, 0.25, 10000)
    assert name == "bosz2024_mp_t6000_g+4.0_m+0.00_a+0.25_c+0.00_v1_r10000_resam.txt.gz"
    m = NAME_RE.match(sg.bosz_filename(7750, 3.5, -0.75, 0.0, 5000, atmos="ap"))
    assert m is not None
    assert m["atmos"] == "ap" and m["teff"] == "7750" and m["logg"] == "+3.5"
    assert m["feh"] == "-0.75" and m["r"] == "5000"


def test_format_rows_is_printf_exact():
    rng = np.random.default_rng(3)
    vals = 10.0 ** rng.uniform(-7, 9, 20000)
    edge = np.array([0.0, 1.0, 9.99995, 9.999949999, 1e-6, 0.99999, 1.03125, 2.5e-5, 99999.5])
    first = np.concatenate([vals, edge])
    second = np.concatenate([vals[::-1], edge[::-1]])
    expected = "".join(f"{a:.4e} {b:.4e}\n" for a, b in zip(first, second, strict=True))
    assert bosz._format_rows(first, second) == expected.encode()
    # three-digit exponents fall back to Python and stay exact
    tiny = np.array([1e-120, 3.3e-101])
    assert bosz._format_rows(tiny, tiny) == b"1.0000e-120 1.0000e-120\n3.3000e-101 3.3000e-101\n"
    with pytest.raises(ValueError, match="finite"):
        bosz._format_rows(np.array([-1.0]), np.array([1.0]))


# --------------------------------------------------------------------------------------------
# Line list
# --------------------------------------------------------------------------------------------


def test_line_list_contents():
    lines = sg.line_list()
    assert lines is sg.DEFAULT_LINES
    metal = sg.line_list("metal")
    assert 1500 <= len(metal) <= 4000
    assert metal.wavelength.min() >= 3000.0 and metal.wavelength.max() <= 25000.0
    # denser in the blue (per Angstrom)
    blue = np.sum((metal.wavelength > 3000) & (metal.wavelength < 4000))
    red = np.sum((metal.wavelength > 20000) & (metal.wavelength < 21000))
    assert blue > 5 * red
    assert 0.18 < metal.alpha.mean() < 0.32
    with pytest.raises(ValueError, match="read-only"):
        lines.wavelength[0] = 1.0
    with pytest.raises(ValueError, match="kind"):
        sg.line_list("iron")


@pytest.mark.parametrize(
    ("name", "wavelength"),
    [
        ("H I 3-2", 6562.80),
        ("H I 4-2", 4861.33),
        ("H I 5-2", 4340.47),
        ("H I 6-2", 4101.74),
        ("H I 7-2", 3970.07),
        ("H I 8-2", 3889.05),
        ("H I 9-2", 3835.38),
        ("H I 13-3", 8665.02),
        ("H I 12-3", 8750.47),
        ("H I 6-3", 10938.1),
        ("H I 5-3", 12818.1),
        ("Ca II K", 3933.66),
        ("Ca II H", 3968.47),
        ("Na I D2", 5889.95),
        ("Na I D1", 5895.92),
        ("Mg I b1", 5183.60),
    ],
)
def test_named_lines_at_air_wavelengths(name, wavelength):
    lines = sg.line_list()
    sel = lines.name == name
    assert sel.sum() == 1
    assert abs(lines.wavelength[sel][0] - wavelength) < 0.02


def test_computed_hydrogen_members_continue_the_series():
    hyd = sg.line_list("H")
    balmer = np.sort(hyd.wavelength[hyd.n_lower == 2])[::-1]
    assert np.all(np.diff(balmer) < 0) and balmer[-1] > 3646.0  # converge on the Balmer limit
    assert set(hyd.n_lower) == {2, 3, 4}
    assert np.all(hyd.f_value[1:] > 0)


# --------------------------------------------------------------------------------------------
# The model: physics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teff", "logg", "feh", "alpha"),
    [(5000, 3.5, -1.0, 0.25), (6000, 4.0, 0.0, 0.0), (8000, 5.0, 0.5, 0.0)],
)
def test_energy_conservation_and_flux_below_continuum(teff, logg, feh, alpha):
    wave = sg.bosz_wavelength_grid(1000)  # the whole BOSZ range, 500-320000 A
    flux, cont = sg.synthetic_spectrum(wave, teff, logg, feh, alpha, 1000)
    assert flux.dtype == np.float64 and flux.shape == wave.shape
    total = np.trapezoid(flux, wave)
    assert total == pytest.approx(SIGMA_SB * teff**4, rel=0.03)
    assert np.all(flux <= cont * (1 + 1e-9))
    assert np.all(flux >= 0)


def test_flux_below_continuum_at_high_resolution():
    for params in ((5000, 4.0, -1.0), (6000, 4.0, 0.5), (8000, 4.0, -1.0)):
        flux, cont = spectrum(*params)
        assert np.all(flux <= cont * (1 + 1e-9))


@pytest.mark.parametrize(("teff", "feh"), [(5000, -1.0), (6000, 0.5), (8000, -1.0)])
def test_halpha_minimum_at_air_wavelength(teff, feh):
    flux, cont = spectrum(teff, 4.0, feh)  # R = 10000, on the BOSZ grid
    sel = np.abs(WAVE_OPT - 6562.8) < 3.0
    assert abs(WAVE_OPT[sel][np.argmin(flux[sel] / cont[sel])] - 6562.80) < 0.2


@pytest.mark.parametrize("centre", [4861.33, 5889.95, 5183.60, 8542.09, 3933.66])
def test_line_minima_at_air_wavelengths(centre):
    flux, cont = spectrum(6000, 4.0, 0.0)
    sel = np.abs(WAVE_OPT - centre) < 1.0
    pixel = np.diff(WAVE_OPT[sel]).max()
    assert abs(WAVE_OPT[sel][np.argmin(flux[sel] / cont[sel])] - centre) <= 0.6 * pixel


def test_hbeta_equivalent_width_grows_from_5000_to_8000_K():
    # [M/H] = -1 keeps the metal lines around H-beta small
    ews = [
        equivalent_width(*spectrum(t, 4.0, -1.0), 4861.33, 20.0) for t in (5000, 6000, 7000, 8000)
    ]
    assert np.all(np.diff(ews) > 0), ews
    assert ews[-1] > 2 * ews[0]


def test_hbeta_equivalent_width_near_solar_value():
    # [M/H] = -5: hydrogen only; EW(H-beta) of a 6000 K dwarf is 3-4 A
    ew = equivalent_width(*spectrum(6000, 4.0, -5.0), 4861.33, 150.0)
    assert 2.8 < ew < 4.5


def test_hydrogen_wings_wider_at_higher_gravity():
    # [M/H] = -5: hydrogen only
    ews = [equivalent_width(*spectrum(6000, logg, -5.0), 4861.33, 150.0) for logg in (4.0, 5.0)]
    assert ews[1] > ews[0]


def test_balmer_jump_strong_near_8000_K_and_weak_when_cool():
    def jump(teff, logg):
        _, cont = spectrum(teff, logg, -1.0)
        below = cont[(WAVE_OPT > 3600) & (WAVE_OPT < 3630)].mean()
        above = cont[(WAVE_OPT > 3665) & (WAVE_OPT < 3700)].mean()
        return 1.0 - below / above

    assert 0.3 < jump(8000, 4.0) < 0.65
    assert jump(5000, 4.0) < 0.12
    assert jump(5000, 4.0) < jump(6000, 4.0) < jump(7000, 4.0) < jump(8000, 4.0)
    assert jump(8000, 5.0) < jump(8000, 3.5)


@pytest.mark.parametrize(
    ("centre", "is_alpha"), [(5269.54, False), (5183.60, True), (8542.09, True)]
)
def test_metal_lines_deepen_with_metallicity(centre, is_alpha):
    depths = [line_depth(*spectrum(6000, 4.0, feh), centre) for feh in (-1.0, -0.5, 0.0, 0.5)]
    assert np.all(np.diff(depths) > 0), depths
    enhanced = line_depth(*spectrum(6000, 4.0, -0.5, 0.25), centre)
    if is_alpha:
        assert enhanced > depths[1] + 0.02
    else:
        assert enhanced == pytest.approx(depths[1], abs=0.01)


def test_metal_lines_weaken_with_teff():
    depths = [line_depth(*spectrum(t, 4.0, -1.0), 5269.54) for t in (5000, 6000, 7000, 8000)]
    assert np.all(np.diff(depths) < 0), depths


def test_blue_more_blanketed_than_red():
    flux, cont = spectrum(6000, 4.0, 0.0)

    def blanket(lo, hi):
        sel = (WAVE_OPT > lo) & (WAVE_OPT < hi)
        return 1.0 - flux[sel].sum() / cont[sel].sum()

    assert blanket(3500, 4000) > 2 * blanket(4500, 5000) > 2 * blanket(7000, 8000) > 0


def test_resolution_tag_is_true():
    # an R=5000 spectrum is the R=20000 one convolved with the difference Gaussian
    wave = sg.bosz_wavelength_grid(50000, 5000.0, 5400.0)
    f5, c5 = sg.synthetic_spectrum(wave, 6000, 4.0, 0.0, 0.0, 5000)
    f20, c20 = sg.synthetic_spectrum(wave, 6000, 4.0, 0.0, 0.0, 20000)
    dln = math.log(wave[1] / wave[0])
    fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sigma = math.sqrt(5000.0**-2 - 20000.0**-2) * fwhm_to_sigma / dln
    x = np.arange(-int(6 * sigma), int(6 * sigma) + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    smoothed = np.convolve(f20 / c20, kernel, mode="same")
    inner = slice(x.size, -x.size)
    np.testing.assert_allclose(smoothed[inner], (f5 / c5)[inner], atol=0.01)
    # and the R=20000 spectrum is much sharper
    assert np.std(f20 / c20) > 1.3 * np.std(f5 / c5)


def test_smooth_in_parameters():
    # locally linear along a direction in (teff, logg, feh, alpha): second differences are
    # much smaller than first differences
    f = [spectrum(6000.0 + 10 * k, 4.0 + 0.02 * k, 0.02 * k, 0.01 * k)[0] for k in (0, 1, 2)]
    first = np.abs(f[2] - f[0])
    second = np.abs(f[2] - 2 * f[1] + f[0])
    assert np.max(second) < 0.05 * np.max(first)


def test_interpolation_between_grid_points_is_meaningful():
    # half a grid step either side in Teff and [M/H]: the mean of the neighbours is close to
    # the midpoint
    fa, _ = spectrum(5875, 4.0, -0.125)
    fm, _ = spectrum(6000, 4.0, 0.0)
    fb, _ = spectrum(6125, 4.0, 0.125)
    assert np.median(np.abs(0.5 * (fa + fb) / fm - 1)) < 0.01


def test_deterministic_and_shape_preserving():
    wave = np.array([[6562.8, 4861.33], [1000.0, 100000.0]])
    f1, c1 = sg.synthetic_spectrum(wave, 6000, 4.0, 0.0, 0.0, 5000)
    f2, c2 = sg.synthetic_spectrum(wave, 6000, 4.0, 0.0, 0.0, 5000)
    assert f1.shape == wave.shape
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(c1, c2)
    # outside the lines' domain the flux is continuum times a smooth haze, never above it
    assert f1[1, 1] == pytest.approx(c1[1, 1], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teff": 2000.0}, "teff"),
        ({"logg": 7.0}, "logg"),
        ({"feh": float("nan")}, "feh"),
        ({"alpha": 3.0}, "alpha"),
        ({"resolution": 10.0}, "resolution"),
    ],
)
def test_invalid_parameters(kwargs, match):
    args = {"teff": 6000.0, "logg": 4.0, "feh": 0.0, "alpha": 0.0, "resolution": 5000.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sg.synthetic_spectrum([5000.0], **args)


def test_invalid_wavelengths():
    with pytest.raises(ValueError, match="wavelength"):
        sg.synthetic_spectrum([5000.0, -1.0], 6000, 4.0, 0.0)


def test_fast_enough():
    wave = sg.bosz_wavelength_grid(10000)
    start = time.perf_counter()
    sg.synthetic_spectrum(wave, 6000, 4.0, 0.0, 0.0, 10000)
    # ~0.1 s here; the bound leaves room for slow CI machines
    assert time.perf_counter() - start < 1.5


@pytest.mark.requires_shared
@requires_real_bosz
def test_broad_band_shape_like_real_bosz():
    real_wave = np.loadtxt(REAL_BOSZ / "bosz2024_wave_r5000.txt")
    real = np.loadtxt(REAL_T6000)
    flux, cont = sg.synthetic_spectrum(real_wave, 6000, 4.0, 0.0, 0.0, 5000)

    def ratio(f):
        blue = f[(real_wave > 4000) & (real_wave < 5000)].mean()
        red = f[(real_wave > 7000) & (real_wave < 8000)].mean()
        return blue / red

    assert ratio(flux) == pytest.approx(ratio(real[:, 0]), rel=0.10)
    assert ratio(cont) == pytest.approx(ratio(real[:, 1]), rel=0.10)
    # same flux scale: 4 pi H integrates to sigma Teff^4 in both
    assert np.trapezoid(flux, real_wave) == pytest.approx(
        4 * np.pi * np.trapezoid(real[:, 0], real_wave), rel=0.02
    )
    # the same lines at the same (air) wavelengths: H-alpha and Na D minima within a pixel
    for centre in (6562.8, 5889.95):
        sel = np.abs(real_wave - centre) < 1.5
        ours = real_wave[sel][np.argmin(flux[sel] / cont[sel])]
        theirs = real_wave[sel][np.argmin(real[sel, 0] / real[sel, 1])]
        assert abs(ours - theirs) < 0.6


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------

#: A tiny grid: the small defaults cut to two Teff and one [M/H] (3 files, ~0.3 s).
TINY = {"small": True, "teffs": [7000, 7500], "fehs": [0.0]}
#: One point with its 'ap' twin (2 files, one model).
MINI = {"small": True, "teffs": [7500], "loggs": [4.0], "fehs": [0.0]}


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory) -> Path:
    return sg.write_synthetic_grid(tmp_path_factory.mktemp("grid") / "bosz", **TINY)


def test_layout_holes_and_ap_twins(tiny_grid):
    files = sorted(p.relative_to(tiny_grid).as_posix() for p in tiny_grid.rglob("*") if p.is_file())
    assert files == [
        sg.SYNTHETIC_MARKER,
        "bosz2024_wave_r5000.txt",
        "r5000/m+0.00/bosz2024_ap_t7500_g+4.0_m+0.00_a+0.00_c+0.00_v1_r5000_resam.txt.gz",
        "r5000/m+0.00/bosz2024_mp_t7000_g+4.5_m+0.00_a+0.00_c+0.00_v1_r5000_resam.txt.gz",
        "r5000/m+0.00/bosz2024_mp_t7500_g+4.0_m+0.00_a+0.00_c+0.00_v1_r5000_resam.txt.gz",
    ]
    for path in tiny_grid.rglob("*.gz"):
        m = NAME_RE.match(path.name)
        assert m is not None and path.parent.name == f"m{m['feh']}"
        assert path.parent.parent.name == f"r{m['r']}"


def test_marker_file(tiny_grid):
    text = (tiny_grid / sg.SYNTHETIC_MARKER).read_text()
    assert text.startswith("SYNTHETIC kspec-fluxcal grid, not BOSZ")
    assert f"version {sg.GENERATOR_VERSION}" in text
    assert f"seed: {sg.LINE_LIST_SEED}" in text
    assert "R=5000" in text and "teff=[7000.0, 7500.0]" in text
    assert sg.SYNTHETIC_MARKER == "SYNTHETIC_GRID.txt"


def test_file_format(tiny_grid):
    wave_text = (tiny_grid / "bosz2024_wave_r5000.txt").read_text().splitlines()
    assert all(re.fullmatch(r"\d\.\d{7}e[+-]\d\d", ln) for ln in wave_text)
    wave = np.array(wave_text, dtype=float)
    assert np.all(np.diff(wave) > 0) and wave[0] >= 2500 and wave[-1] <= 26000
    for path in tiny_grid.rglob("*.gz"):
        raw = gzip.decompress(path.read_bytes())
        rows = raw.split(b"\n")
        assert rows[-1] == b""  # ends with a newline
        rows = rows[:-1]
        assert len(rows) == wave.size
        assert all(ROW_RE.match(r) for r in rows)


def test_file_content_is_the_model(tiny_grid):
    wave = np.loadtxt(tiny_grid / "bosz2024_wave_r5000.txt")
    directory = tiny_grid / "r5000" / "m+0.00"
    mp = np.loadtxt(directory / sg.bosz_filename(7500, 4.0, 0.0, 0.0, 5000))
    ap = np.loadtxt(directory / sg.bosz_filename(7500, 4.0, 0.0, 0.0, 5000, atmos="ap"))
    flux, cont = sg.synthetic_spectrum(wave, 7500, 4.0, 0.0, 0.0, 5000)
    np.testing.assert_allclose(4 * np.pi * mp[:, 0], flux, rtol=6e-5)
    np.testing.assert_allclose(4 * np.pi * mp[:, 1], cont, rtol=6e-5)
    # the ATLAS9 twin is nearly, not exactly, the same
    ratio = ap / mp
    assert np.all(np.abs(ratio - 1) < 0.006)
    assert np.ptp(ratio) > 0.002


def test_full_range_file_energy_and_far_uv(tmp_path):
    root = sg.write_synthetic_grid(
        tmp_path, resolution=500, teffs=[6000], loggs=[4.0], fehs=[0.0], alphas=[0.0]
    )
    wave = np.loadtxt(root / "bosz2024_wave_r500.txt")
    assert wave.size == 7500
    data = np.loadtxt(root / "r500" / "m+0.00" / sg.bosz_filename(6000, 4.0, 0.0, 0.0, 500))
    assert data.shape == (7500, 2)
    assert 4 * np.pi * np.trapezoid(data[:, 0], wave) == pytest.approx(SIGMA_SB * 6000**4, rel=0.03)
    # like BOSZ: flux 0 and continuum 1.0 where the far-UV continuum underflows
    dark = data[:, 1] == 1.0
    assert dark[0] and not dark[-1]
    assert np.all(data[dark, 0] == 0.0)
    assert wave[dark].max() < 1500.0
    assert np.all(data[~dark, 0] <= data[~dark, 1] * (1 + 1e-4))


def test_second_run_writes_nothing(tmp_path, tiny_grid):
    before = snapshot(tiny_grid)
    assert sg.write_synthetic_grid(tiny_grid, **TINY) == tiny_grid
    assert snapshot(tiny_grid) == before
    assert not list(tiny_grid.rglob(".kspec-tmp-*"))
    root = sg.write_synthetic_grid(tmp_path / "g", **MINI)
    before = snapshot(root)
    assert sg.write_synthetic_grid(tmp_path / "g", **MINI) == root
    assert snapshot(root) == before
    assert not list(root.rglob(".kspec-tmp-*"))


def test_overwrite_rewrites_the_same_bytes(tmp_path):
    root = sg.write_synthetic_grid(tmp_path / "g", **MINI)
    before = snapshot(root)
    sg.write_synthetic_grid(tmp_path / "g", overwrite=True, **MINI)
    after = snapshot(root)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    changed = [k for k in after if k.endswith(".gz") and after[k][0] != before[k][0]]
    assert len(changed) == 2


def test_interrupted_run_resumes_without_temp_files(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic_grid._file_bytes

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(synthetic_grid, "_file_bytes", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        sg.write_synthetic_grid(tmp_path / "g", **MINI)
    monkeypatch.setattr(synthetic_grid, "_file_bytes", real)
    root = tmp_path / "g"
    assert (root / sg.SYNTHETIC_MARKER).exists()  # labelled synthetic even when incomplete
    assert len(list(root.rglob("*.gz"))) == 1
    assert not list(root.rglob(".kspec-tmp-*"))
    # a truncated file (not written by us atomically) is detected and replaced
    first = next(root.rglob("*.gz"))
    first.write_bytes(first.read_bytes()[:-100])
    # temporary files of a writer killed long ago are removed, recent ones (in use) are not
    stale = first.parent / ".kspec-tmp-killed.gz.abc123"
    recent = first.parent / ".kspec-tmp-running.gz.def456"
    stale.write_bytes(b"x")
    recent.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    sg.write_synthetic_grid(root, **MINI)
    assert len(list(root.rglob("*.gz"))) == 2
    for path in root.rglob("*.gz"):
        gzip.decompress(path.read_bytes())
    assert list(root.rglob(".kspec-tmp-*")) == [recent]


def test_threads_give_the_same_files(tmp_path, tiny_grid):
    root = sg.write_synthetic_grid(tmp_path / "g", workers=2, **TINY)
    ours = {k: v[1] for k, v in snapshot(root).items()}
    ref = {k: v[1] for k, v in snapshot(tiny_grid).items()}
    assert ours == ref


def test_other_parameters_in_same_directory(tmp_path):
    root = sg.write_synthetic_grid(tmp_path / "g", **MINI)
    sg.write_synthetic_grid(root, small=True, teffs=[6000], loggs=[4.5], fehs=[-0.5])
    text = (root / sg.SYNTHETIC_MARKER).read_text()
    assert text.count("\nrun: ") == 2
    assert (root / "r5000" / "m-0.50" / sg.bosz_filename(6000, 4.5, -0.5, 0.0, 5000)).exists()
    # a different wavelength grid for the same R is refused
    with pytest.raises(GridError, match="different wavelength grid"):
        sg.write_synthetic_grid(root, small=True, teffs=[6000], fehs=[0.0], wave_min=3000.0)
    assert (root / sg.SYNTHETIC_MARKER).read_text() == text  # nothing recorded for it


def test_progress_lines(tmp_path, capsys):
    sg.write_synthetic_grid(tmp_path / "g", progress=True, **MINI)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("written" in ln for ln in err)
    assert err[0].startswith("[1/1] r5000/m+0.00/bosz2024_mp_t7500")
    sg.write_synthetic_grid(tmp_path / "g", progress=True, **MINI)
    assert all("exists" in ln for ln in capsys.readouterr().err.splitlines())


def test_no_holes_no_twins(tmp_path):
    root = sg.write_synthetic_grid(tmp_path / "g", holes=False, **MINI)
    names = sorted(p.name for p in root.rglob("*.gz"))
    assert names == [sg.bosz_filename(7500, 4.0, 0.0, 0.0, 5000)]
    assert "holes=[]" in (root / sg.SYNTHETIC_MARKER).read_text()


def test_default_grids_size():
    # the reference subgrid has 520 points (before holes); checked without writing it
    ref = synthetic_grid._REFERENCE_GRID
    n_alpha = sum(2 if f <= -0.5 else 1 for f in ref["fehs"])
    assert len(ref["teffs"]) * len(ref["loggs"]) * n_alpha == 520
    assert sg.bosz_wavelength_grid(ref["resolution"]).size == 150000
    small = synthetic_grid._SMALL_GRID
    wave = sg.bosz_wavelength_grid(small["resolution"], *small["wave"])
    assert wave[0] < 3000 and wave[-1] > 25000  # covers Gaia, PS1 and 2MASS bands


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teffs": [6000.5]}, "decimals"),
        ({"loggs": [4.25]}, "decimals"),
        ({"fehs": [3.0]}, "range"),
        ({"teffs": []}, "no values"),
        ({"workers": 0}, "workers"),
        ({"wave_min": 30000.0, "wave_max": 30001.0}, "fewer than 2"),
    ],
)
def test_writer_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"small": True, "fehs": [0.0], **kwargs}
    with pytest.raises(ValueError, match=match):
        sg.write_synthetic_grid(tmp_path / "g", **args)
