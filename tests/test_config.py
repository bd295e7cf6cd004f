from pathlib import Path

import pytest

from kspec_fluxcal.config import Config, load_config
from kspec_fluxcal.errors import ConfigError

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.toml"


def test_default_file_is_the_documented_defaults():
    assert load_config(DEFAULT) == Config()
    assert DEFAULT.read_text() == Config().to_toml(), "regenerate configs/default.toml"


def test_values_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[fit]\nmetric = "huber"\nteff_window = 500\n[combine]\nsmooth = false\n')
    cfg = load_config(path, sigma_clip=2.5, instrument__fwhm=7)
    assert cfg.fit.metric == "huber" and cfg.fit.teff_window == 500.0
    assert cfg.combine.smooth is False and cfg.combine.sigma_clip == 2.5
    assert cfg.instrument.fwhm == 7.0
    assert cfg.fit.rv_max == Config().fit.rv_max


@pytest.mark.parametrize(
    "text, match",
    [
        ("[fitt]\nmetric='chi2'\n",
         r"section \[fitt\]: unknown section; valid sections: instrument"),
        ("[fit]\nmetrik='chi2'\n", r"\[fit\] metrik: unknown option; valid options: metric"),
        ("[fit]\nmetric='l1'\n", r"\[fit\] metric: 'l1' is not one of 'chi2', 'huber'"),
        ("[fit]\nrv_max=-5\n", r"\[fit\] rv_max: -5.0 is below the minimum 10.0"),
        ("[fit]\nrefine='yes'\n", r"\[fit\] refine: expected bool"),
        ("[photometry]\nbands=['gaiadr2-G','sdss-u']\n",
         r"invalid value\(s\) \['sdss-u'\]; valid: panstarrs-g, gaiadr2-BP"),
        # A band listed twice counted as two measurements (min_bands met by one band).
        ("[photometry]\nbands=['panstarrs-g','panstarrs-g','panstarrs-r']\n",
         r"\[photometry\] bands: panstarrs-g given more than once"),
        ("[masks]\nextra=[1]\n", r"\[masks\] extra: expected a list of strings, got \[1\]"),
        ("[fit]\nmax_chi2_dof=10\n", r"\[fit\] max_chi2_dof: removed: stars are judged by "
         r"their model error, not chi\^2/dof; see \[fit\] max_model_error"),
        # A window of 5001 pixels took 107 s an exposure, 100000 hung.
        ("[continuum]\nwindow=5001\n", r"\[continuum\] window: 5001 is above the maximum"),
        ("[fit\nmetric=1\n", "not valid TOML"),
    ],
)
def test_invalid_config(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "bad.toml" in str(info.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="unknown option; valid:"):
        Config().replace(nonsense=1)
    with pytest.raises(ConfigError, match=r"ambiguous option \(in continuum, combine\)"):
        Config().replace(iterations=3)
    assert Config().replace(combine__iterations=2).combine.iterations == 2


def test_provenance_names_the_source_hash_and_changed_options(tmp_path):
    """The products recorded none of the options a configuration changed (only the
    combination's); the archive's config_hash is the same digest."""
    assert Config().provenance() == (f"configuration (package defaults), hash "
                                     f"{Config().digest()}: every option at its default")
    path = tmp_path / "c.toml"
    path.write_text('[fit]\nmetric = "huber"\n[instrument]\nfwhm = 3.0\n')
    cfg = load_config(path)
    assert cfg.changed() == ["[instrument] fwhm = 3.0", "[fit] metric = 'huber'"]
    assert cfg.provenance() == (f"configuration {path}, hash {cfg.digest()}: "
                                "[instrument] fwhm = 3.0; [fit] metric = 'huber'")
    assert cfg.digest() != Config().digest() and len(cfg.digest()) == 12


def test_utf8_file_with_a_byte_order_mark(tmp_path):
    """A byte-order mark (Notepad's UTF-8) was 'not valid TOML (Invalid statement (at line
    1, column 1))'."""
    path = tmp_path / "c.toml"
    path.write_bytes("\ufeff# Teff window, \u00b1 K\n[fit]\nmetric = 'huber'\n".encode())
    assert load_config(path).fit.metric == "huber"
