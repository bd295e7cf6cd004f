"""The standard-star fit: each standard of an exposure matched to its templates.

:func:`kspec_fluxcal.fit.standards.fit_standards` composes the steps, in the order they run:

- :mod:`.inputs`: the observed standards (continuum-normalised spectra, colours, priors);
- :mod:`.exposure_templates`: the template library at the exposure's pixels and line spread;
- :mod:`.scan`: radial velocity and the scan of every template;
- :mod:`.line_spread`: the choice of parameters (:mod:`.parameter_choice`, between grid
  points with :mod:`.refinement`, scored by spectrum and photometry,
  :mod:`.model_photometry`), the line-spread width the stars show, and the choice again at
  that width;
- :mod:`.final_model`: the model at Earth (reddening, scale, warp, XP);
- :mod:`.acceptance`: the calibration vectors and each star's verdict.

Beneath them: :mod:`.matching` (scores with a smooth correction), :mod:`.velocity` (cross
correlation) and :mod:`.shifts` (Doppler shifts as sparse matrices). Nothing here imports the
calibration, the products or the survey.
"""
