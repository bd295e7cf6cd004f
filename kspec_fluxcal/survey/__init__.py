"""The survey: every RED file of a lake recalibrated as one Dask job, its calibrations kept in
an archive, and a survey-wide calibration model fitted from them.

This room sits above the pipeline (:func:`kspec_fluxcal.pipeline.calibrate` calibrates each
exposure in a task); nothing in the pipeline imports it.

Modules
-------
job
    :func:`run_survey`: plan (:func:`discover`, :func:`plan_survey`), the first pass (a
    ``calibrate-<EXPID>`` task per exposure), then the model and the fallback.
tasks
    What every task shares: key tokens, running an exposure's work in a worker, collecting
    results into the archive, the progress bar.
report
    :class:`SurveyReport` and ``OUT/notes.json`` (:func:`write_notes`).
cluster
    The LocalCluster (:func:`local_cluster`) or a running scheduler the job runs on.
archive, plots
    ``OUT/archive.zarr`` (:func:`open_archive`, :func:`throughput`) and its figures
    (:func:`plot_archive`).
model, weights, levels
    The survey model's numerics: per-night throughput and extinction curves, the fit's
    weights and error model, the nights' grey levels.
model_job, model_store, recalibrate
    The model as Dask work, ``OUT/model.zarr`` (:func:`open_model`), and an exposure's
    calibration from the model.
fallback
    The opt-in archive fallback.
"""

from .archive import open_archive, throughput
from .cluster import WORKER_MALLOC_ENV, local_cluster
from .job import discover, plan_survey, run_survey
from .model_store import open_model
from .plots import plot_archive
from .report import SurveyReport, write_notes

__all__ = ["run_survey", "discover", "plan_survey", "SurveyReport", "write_notes",
           "local_cluster", "WORKER_MALLOC_ENV", "open_archive", "throughput", "open_model",
           "plot_archive"]
