"""Download the BOSZ 2024 stellar template subgrid from MAST.

The files are fetched from the MAST high-level science product (HLSP) area of BOSZ 2024
(Meszaros et al. 2024, A&A 688, A197; HLSP DOI 10.17909/T95G68) and laid out as the grid
reader expects (formats contract, section 3)::

    OUT/bosz2024_wave_r10000.txt
    OUT/r10000/m+0.00/bosz2024_mp_t6000_g+4.0_m+0.00_a+0.00_c+0.00_v1_r10000_resam.txt.gz
    ...

Remote layout. The public file URLs are::

    https://archive.stsci.edu/hlsps/bosz/bosz2024/{resolution}/m{feh:+.2f}/{filename}
    https://archive.stsci.edu/hlsps/bosz/bosz2024/wavelength_grids/bosz2024_wave_{resolution}.txt

This was checked against public material, not against the live server: the MAST BOSZ HLSP
page (https://archive.stsci.edu/hlsp/bosz) gives ``https://archive.stsci.edu/hlsps/bosz/bosz2024/``
as the data root, with one ``{resolution}/{metallicity}/`` directory per product, and a
wavelength grid per resampled resolution in ``wavelength_grids/``. Independent download code
using exactly these paths, with a literal ``+`` in the path, exists, e.g. a wget loop over
``.../bosz2024/r500/m+0.00/bosz2024_mp_t..._v0_r500_resam.txt.gz`` and a test that asserts
``.../bosz2024/r20000/m+0.00/bosz2024_mp_t6000_g+4.0_m+0.00_a+0.00_c+0.00_v2_r20000_resam.txt.gz``.
``+`` is a legal character in a URL path, so it is not percent-encoded here.

How a download is made safe. Each file is streamed into a hidden temporary file
(``.NAME.<unique>.part``) in its destination directory; it is renamed onto the final name with
:func:`os.replace` only after (1) the number of bytes received equals the ``Content-Length``
the server announced and (2) for ``.gz`` files the whole gzip stream decompresses, including
its CRC and length trailer. A killed or failed download therefore never leaves a file under
the final name.

When a file counts as complete (and is skipped unless ``force``). Because of the above, a file
under its final name was complete when it was written, so no state is kept and no request is
made to decide: a file is complete if it is a non-empty regular file and, for ``.gz`` files,
its gzip stream still decompresses to the end (which catches files truncated or damaged after
the fact, e.g. copied by hand). Plain-text files (the wavelength grid) are only checked for
being non-empty.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import itertools
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .constants import BOSZ_RESOLUTIONS
from .errors import DownloadError

__all__ = [
    "MAST_BASE_URL",
    "DownloadSummary",
    "bosz_filename",
    "bosz_subgrid",
    "download_grid",
    "subgrid_urls",
]

#: Root of the MAST HLSP download area; BOSZ 2024 lives under ``hlsps/bosz/bosz2024``.
MAST_BASE_URL = "https://archive.stsci.edu"

_BOSZ_PATH = "hlsps/bosz/bosz2024"

# The reference subgrid (F-type spectrophotometric standards; see bosz_subgrid).
_TEFFS = tuple(range(5000, 8001, 250))
_LOGGS = (3.5, 4.0, 4.5, 5.0)
_FEHS = (-1.00, -0.75, -0.50, -0.25, 0.00, 0.25, 0.50)
_ALPHA_ENHANCED_BELOW_FEH = -0.50
_CARBON = 0.00
_VMICRO = 1
# BOSZ 2024 has MARCS ('mp', 'ms') up to 8000 K and ATLAS9 ('ap') from 7500 K; one atmosphere
# family across the whole subgrid avoids a seam inside the Teff range we interpolate over.
_ATMOS = "mp"

_ATMOSPHERES = ("mp", "ms", "ap")
_CHUNK = 1 << 20
_USER_AGENT = f"kspec-fluxcal/{__version__} (BOSZ subgrid downloader; Python urllib)"
# HTTP statuses worth retrying: server-side trouble, request timeout and rate limiting.
_RETRY_STATUSES = frozenset({408, 425, 429})
_NOT_FOUND_STATUSES = frozenset({404, 410})


def _check_resolution(resolution: str) -> str:
    if resolution not in BOSZ_RESOLUTIONS:
        choices = ", ".join(BOSZ_RESOLUTIONS)
        raise ValueError(f"unknown BOSZ resolution {resolution!r}; valid choices: {choices}")
    return resolution


def _as_int(value: float, name: str) -> int:
    as_int = int(round(float(value)))
    if abs(float(value) - as_int) > 1e-9:
        raise ValueError(f"{name} must be a whole number in BOSZ file names, got {value!r}")
    return as_int


def _signed(value: float, decimals: int) -> str:
    # Rounding first and adding 0.0 turns -0.0 (and -0.001) into +0.00, as BOSZ spells it.
    return f"{round(float(value), decimals) + 0.0:+.{decimals}f}"


def _feh_dir(feh: float) -> str:
    return f"m{_signed(feh, 2)}"


def _wave_filename(resolution: str) -> str:
    return f"bosz2024_wave_{resolution}.txt"


def bosz_filename(
    atmos: str,
    teff: float,
    logg: float,
    feh: float,
    alpha: float,
    carbon: float = 0.0,
    vmicro: float = 1,
    resolution: str = "r10000",
) -> str:
    """Name of one BOSZ 2024 spectrum file, exactly as MAST spells it.

    Parameters
    ----------
    atmos : {'mp', 'ms', 'ap'}
        Model atmosphere: MARCS plane-parallel, MARCS spherical, ATLAS9 plane-parallel.
    teff : float
        Effective temperature, K; must be a whole number.
    logg : float
        Surface gravity, log10(cm s^-2).
    feh : float
        Metallicity [M/H], dex.
    alpha : float
        Alpha-element enhancement [alpha/M], dex.
    carbon : float, optional
        Carbon enhancement [C/M], dex.
    vmicro : float, optional
        Microturbulent velocity, km/s; must be a whole number (BOSZ has 0, 1, 2, 4).
    resolution : str, optional
        Resolution tag, one of :data:`kspec_fluxcal.constants.BOSZ_RESOLUTIONS`.

    Returns
    -------
    str
        For example ``bosz2024_mp_t6000_g+4.0_m+0.00_a+0.00_c+0.00_v1_r10000_resam.txt.gz``.
        Resampled products end in ``_resam``; the native-resolution ``rorig`` product ends in
        ``_noresam``.

    Raises
    ------
    ValueError
        If the atmosphere or resolution is unknown, or Teff or vmicro is not whole.
    """
    _check_resolution(resolution)
    if atmos not in _ATMOSPHERES:
        raise ValueError(f"unknown BOSZ atmosphere {atmos!r}; valid choices: mp, ms, ap")
    product = "noresam" if resolution == "rorig" else "resam"
    return (
        f"bosz2024_{atmos}_t{_as_int(teff, 'teff')}_g{_signed(logg, 1)}"
        f"_m{_signed(feh, 2)}_a{_signed(alpha, 2)}_c{_signed(carbon, 2)}"
        f"_v{_as_int(vmicro, 'vmicro')}_{resolution}_{product}.txt.gz"
    )


def bosz_subgrid(resolution: str = "r10000") -> list[dict[str, Any]]:
    """Grid points of the reference BOSZ 2024 subgrid.

    The subgrid covers F-type (and neighbouring) spectrophotometric standards: Teff 5000-8000 K
    in steps of 250 K; log g 3.5, 4.0, 4.5, 5.0; [M/H] -1.00 to +0.50 in steps of 0.25;
    [alpha/M] +0.00 everywhere plus +0.25 for [M/H] <= -0.50; [C/M] +0.00; vmicro 1 km/s; MARCS
    plane-parallel atmospheres ('mp') throughout. BOSZ 2024 also has ATLAS9 ('ap') models at
    7500-8000 K; they are not listed. That is 13 * 4 * (7 + 3) = 520 points.

    Parameters
    ----------
    resolution : str, optional
        Resolution tag, one of :data:`kspec_fluxcal.constants.BOSZ_RESOLUTIONS`.

    Returns
    -------
    list of dict
        One dict per point with keys ``atmos, teff, logg, feh, alpha, carbon, vmicro,
        resolution``, so that ``bosz_filename(**point)`` names its file. Ordered by [M/H],
        [alpha/M], Teff, log g.

    Raises
    ------
    ValueError
        If the resolution is unknown.
    """
    _check_resolution(resolution)
    points = []
    for feh in _FEHS:
        alphas = (0.00, 0.25) if feh <= _ALPHA_ENHANCED_BELOW_FEH else (0.00,)
        for alpha, teff, logg in itertools.product(alphas, _TEFFS, _LOGGS):
            points.append(
                {
                    "atmos": _ATMOS,
                    "teff": teff,
                    "logg": logg,
                    "feh": feh,
                    "alpha": alpha,
                    "carbon": _CARBON,
                    "vmicro": _VMICRO,
                    "resolution": resolution,
                }
            )
    return points


def subgrid_urls(
    base_url: str = MAST_BASE_URL,
    resolution: str = "r10000",
    *,
    points: Iterable[Mapping[str, Any]] | None = None,
) -> list[tuple[str, Path]]:
    """URLs and local destinations of the subgrid files and their wavelength grid.

    Parameters
    ----------
    base_url : str, optional
        Download root; the files are under ``{base_url}/hlsps/bosz/bosz2024/``.
    resolution : str, optional
        Resolution tag, one of :data:`kspec_fluxcal.constants.BOSZ_RESOLUTIONS`.
    points : iterable of mapping, optional
        Grid points to fetch, each with the arguments of :func:`bosz_filename` (``resolution``
        may be omitted); default :func:`bosz_subgrid`.

    Returns
    -------
    list of (str, pathlib.Path)
        ``(url, relative destination)`` pairs. The first is the shared wavelength grid
        (``bosz2024_wave_{resolution}.txt`` at the top of the output directory); ``rorig``
        has none, since its files carry their own wavelengths. Then one pair per point, in
        the order given, with destination ``{resolution}/m{feh:+.2f}/{filename}``.

    Raises
    ------
    ValueError
        If the resolution is unknown, or a point names another resolution or is invalid.
    """
    _check_resolution(resolution)
    root = f"{base_url.rstrip('/')}/{_BOSZ_PATH}"
    jobs: list[tuple[str, Path]] = []
    if resolution != "rorig":
        name = _wave_filename(resolution)
        jobs.append((f"{root}/wavelength_grids/{name}", Path(name)))
    for point in bosz_subgrid(resolution) if points is None else points:
        params = dict(point)
        if params.setdefault("resolution", resolution) != resolution:
            raise ValueError(
                f"grid point {point!r} is for resolution {params['resolution']!r}, "
                f"not {resolution!r}"
            )
        name = bosz_filename(**params)
        subdir = _feh_dir(params["feh"])
        jobs.append((f"{root}/{resolution}/{subdir}/{name}", Path(resolution, subdir, name)))
    return jobs


@dataclass
class DownloadSummary:
    """What :func:`download_grid` did with each file.

    Attributes
    ----------
    ok : list of pathlib.Path
        Files downloaded (destination paths).
    skipped : list of pathlib.Path
        Files already complete on disk, not fetched.
    not_found : list of str
        URLs the server answered with 404 (or 410); expected for holes in the BOSZ grid.
    errors : list of (str, str)
        ``(url, reason)`` of files that failed for good, after any retries.
    to_fetch : list of (str, pathlib.Path)
        Dry run only: ``(url, destination)`` of the files that would be fetched.
    dry_run : bool
        Whether this summarises a dry run (nothing was fetched).
    """

    ok: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    to_fetch: list[tuple[str, Path]] = field(default_factory=list)
    dry_run: bool = False

    #: More files than this fraction not found is not the grid's holes (a few per cent of
    #: the subgrid) but names the server does not have: another resolution tag or
    #: microturbulence, another server.
    MISSING_LIMIT = 0.5

    @property
    def mostly_missing(self) -> bool:
        """Whether most of the files were not found (a failed download, not holes)."""
        considered = len(self.ok) + len(self.skipped) + len(self.not_found)
        return bool(self.not_found) and len(self.not_found) > self.MISSING_LIMIT * considered

    @property
    def total(self) -> int:
        """Number of files considered."""
        return sum(len(x) for x in (self.ok, self.skipped, self.not_found, self.errors)) + len(
            self.to_fetch
        )

    @property
    def counts(self) -> dict[str, int]:
        """Number of files per outcome: ``ok, skipped, not_found, errors, to_fetch``."""
        return {
            "ok": len(self.ok),
            "skipped": len(self.skipped),
            "not_found": len(self.not_found),
            "errors": len(self.errors),
            "to_fetch": len(self.to_fetch),
        }

    def __str__(self) -> str:
        files = f"{self.total} file{'' if self.total == 1 else 's'}"
        if self.dry_run:
            return (
                f"{files}: {len(self.to_fetch)} to fetch, {len(self.skipped)} skipped "
                "(dry run, nothing downloaded)"
            )
        n_err = len(self.errors)
        text = (
            f"{files}: {len(self.ok)} ok, {len(self.skipped)} skipped, "
            f"{len(self.not_found)} not found, {n_err} error{'' if n_err == 1 else 's'}"
        )
        if self.errors:
            url, reason = self.errors[0]
            more = f" (and {n_err - 1} more)" if n_err > 1 else ""
            text += f"; first error: {url}: {reason}{more}"
        if self.mostly_missing:
            text += (f"; most files not found, more than the grid's holes: does the server "
                     f"have these names (resolution tag, microturbulence)? First: "
                     f"{self.not_found[0]}")
        return text


class _NotFound(Exception):
    """The server says the file does not exist (a hole in the grid)."""


class _Transient(Exception):
    """A failure worth retrying: network trouble, HTTP 5xx, a truncated or corrupt transfer."""


class _Permanent(Exception):
    """A failure that retrying will not fix (e.g. HTTP 403)."""


def _gzip_ok(path: Path | str) -> str | None:
    """Return None if the gzip stream in ``path`` is complete and intact, else why not."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _is_complete(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file() or st.st_size == 0:
        return False
    return not path.name.endswith(".gz") or _gzip_ok(path) is None


def _remove_stale_parts(dest: Path) -> None:
    # Leftovers of a killed earlier run; the names are ours alone (see _attempt).
    for stale in dest.parent.glob(f".{dest.name}.*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _attempt(url: str, dest: Path, timeout: float) -> None:
    """Fetch ``url`` to ``dest`` once; raise _NotFound, _Transient or _Permanent on failure."""
    request = urllib.request.Request(
        url,
        # identity: urllib does not undo a Content-Encoding, and we store the bytes as served.
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        what = f"HTTP {exc.code} {exc.reason}"
        if exc.code in _NOT_FOUND_STATUSES:
            raise _NotFound(what) from None
        if exc.code >= 500 or exc.code in _RETRY_STATUSES:
            raise _Transient(what) from None
        raise _Permanent(what) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None

    # A name unique across threads and processes, hidden and not ending in .gz/.txt, so that
    # nothing globbing the grid mistakes it for a spectrum.
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
    try:
        with response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.strip().isdigit() else None
            received = 0
            try:
                with open(tmp, "xb") as fh:
                    while chunk := response.read(_CHUNK):
                        fh.write(chunk)
                        received += len(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
        # http.client returns b"" rather than raising when the peer closes before
        # Content-Length bytes arrived, so the count is the only sign of a cut transfer.
        if expected is not None and received != expected:
            raise _Transient(f"truncated transfer: received {received} of {expected} bytes")
        if received == 0:
            raise _Transient("empty response")
        if dest.name.endswith(".gz"):
            problem = _gzip_ok(tmp)
            if problem is not None:
                raise _Transient(f"incomplete or corrupt gzip stream ({problem})")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fetch(
    url: str, dest: Path, *, force: bool, retries: int, backoff: float, timeout: float
) -> tuple[str, str]:
    """Bring one file up to date; return ``(status, reason)``."""
    if not force and _is_complete(dest):
        return "skipped", ""
    _remove_stale_parts(dest)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _attempt(url, dest, timeout)
        except _NotFound as exc:
            return "not found", str(exc)
        except _Permanent as exc:
            return "error", str(exc)
        except _Transient as exc:
            last = str(exc)
        except OSError as exc:
            # Local trouble (e.g. the rename failed): record it rather than abort the whole run.
            return "error", f"{type(exc).__name__}: {exc}"
        else:
            return "ok", ""
    tries = f"{retries + 1} attempt{'' if retries == 0 else 's'}"
    return "error", f"{last} (gave up after {tries})"


def _prepare_output(out: Path, jobs: list[tuple[str, Path]]) -> None:
    """Create the output tree and prove it writable, or raise DownloadError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for parent in sorted({(out / rel).parent for _, rel in jobs}):
            parent.mkdir(parents=True, exist_ok=True)
        # os.access() says yes to root on read-only mounts; creating a file is the real test.
        probe = out / f".kspec_fluxcal_write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise DownloadError(f"{out}: output directory cannot be written: {exc}") from exc


def _check_options(workers: int, retries: int, backoff: float, timeout: float) -> None:
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    if int(retries) < 0:
        raise ValueError(f"retries must be 0 or more, got {retries!r}")
    if not backoff >= 0:
        raise ValueError(f"backoff must be 0 or more seconds, got {backoff!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


class _Progress:
    """One line on stderr every ~5 % of the files, and at the end."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.every = max(1, total // 20)
        self.done = 0
        self.counts = {"ok": 0, "skipped": 0, "not found": 0, "error": 0}
        self._lock = threading.Lock()

    def update(self, status: str) -> None:
        with self._lock:
            self.done += 1
            self.counts[status] += 1
            if not self.enabled or (self.done % self.every and self.done != self.total):
                return
            c = self.counts
            pct = 100.0 * self.done / self.total
            print(
                f"BOSZ download: {self.done}/{self.total} ({pct:.0f}%): {c['ok']} ok, "
                f"{c['skipped']} skipped, {c['not found']} not found, {c['error']} errors",
                file=sys.stderr,
                flush=True,
            )


def download_grid(
    out: str | os.PathLike[str],
    *,
    base_url: str = MAST_BASE_URL,
    resolution: str = "r10000",
    points: Iterable[Mapping[str, Any]] | None = None,
    dry_run: bool = False,
    force: bool = False,
    workers: int = 8,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadSummary:
    """Download the BOSZ 2024 subgrid and its wavelength grid into ``out``.

    Files are fetched concurrently. A transient failure (connection error, time-out, HTTP 5xx,
    408 or 429, a transfer shorter than its ``Content-Length``, a gzip stream that does not
    decompress to the end) is retried after ``backoff * 2**k`` seconds, k = 0, 1, ...; HTTP
    404 is recorded as "not found" at once, since the BOSZ grid has holes. Each file is
    written to a temporary file and renamed into place only once complete (see the module
    docstring), so an interrupted run can simply be run again: complete files are skipped.

    Parameters
    ----------
    out : str or path-like
        Output directory; created if missing. Layout: ``out/bosz2024_wave_{resolution}.txt``
        and ``out/{resolution}/m{feh:+.2f}/{filename}``.
    base_url : str, optional
        Download root (default MAST); tests point it at a local server.
    resolution : str, optional
        Resolution tag, one of :data:`kspec_fluxcal.constants.BOSZ_RESOLUTIONS`.
    points : iterable of mapping, optional
        Grid points to fetch instead of :func:`bosz_subgrid`; see :func:`subgrid_urls`.
    dry_run : bool, optional
        List what would be fetched (``summary.to_fetch``) without touching the network or
        creating anything; files already complete are reported as skipped.
    force : bool, optional
        Fetch every file again even if complete on disk.
    workers : int, optional
        Number of concurrent downloads.
    retries : int, optional
        Retries after the first attempt for transient failures (so at most ``retries + 1``
        requests per file).
    backoff : float, optional
        First retry delay, seconds; doubled at each further retry.
    timeout : float, optional
        Socket time-out for connecting and for each read, seconds.
    progress : bool, optional
        Write a progress line to stderr every ~5 % of the files (in a dry run: one line per
        file to fetch). Nothing is printed when False.

    Returns
    -------
    DownloadSummary
        Outcome per file; per-file failures are recorded there, not raised.

    Raises
    ------
    ValueError
        If the resolution, a grid point or an option is invalid.
    DownloadError
        If the output directory cannot be created or written.
    """
    jobs = subgrid_urls(base_url, resolution, points=points)
    _check_options(workers, retries, backoff, timeout)
    out = Path(out)
    if dry_run:
        return _dry_run(jobs, out, force, progress)
    _prepare_output(out, jobs)
    results = _fetch_all(jobs, out, force=force, workers=int(workers), retries=int(retries),
                         backoff=float(backoff), timeout=float(timeout), progress=progress)
    return _summary(jobs, out, results)


def _dry_run(jobs: list[tuple[str, Path]], out: Path, force: bool,
             progress: bool) -> DownloadSummary:
    """What a run would fetch: the jobs (url, path relative to ``out``) whose file is not
    complete on disk (all of them with ``force``); complete files are reported as skipped."""
    summary = DownloadSummary(dry_run=True)
    for url, rel in jobs:
        dest = out / rel
        if not force and _is_complete(dest):
            summary.skipped.append(dest)
            continue
        summary.to_fetch.append((url, dest))
        if progress:
            print(f"would fetch {url} -> {dest}", file=sys.stderr, flush=True)
    return summary


def _fetch_all(jobs: list[tuple[str, Path]], out: Path, *, force: bool, workers: int,
               retries: int, backoff: float, timeout: float,
               progress: bool) -> list[tuple[str, str]]:
    """Fetch every job (url, path relative to ``out``) on a pool of ``workers`` threads;
    return the (status, reason) of each, in the order of ``jobs``."""
    reporter = _Progress(len(jobs), progress)
    results: list[tuple[str, str] | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bosz-download")
    try:
        futures = {
            pool.submit(
                _fetch,
                url,
                out / rel,
                force=force,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
            ): i
            for i, (url, rel) in enumerate(jobs)
        }
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            reporter.update(results[i][0])
    except BaseException:
        # On Ctrl-C do not start the queued downloads; the running ones clean up after
        # themselves (their temporary files are removed in _attempt).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _summary(jobs: list[tuple[str, Path]], out: Path,
             results: list[tuple[str, str]]) -> DownloadSummary:
    """The :class:`DownloadSummary` of a run: each job's file or url under its outcome."""
    summary = DownloadSummary(dry_run=False)
    for (url, rel), (status, reason) in zip(jobs, results, strict=True):
        if status == "ok":
            summary.ok.append(out / rel)
        elif status == "skipped":
            summary.skipped.append(out / rel)
        elif status == "not found":
            summary.not_found.append(url)
        else:
            summary.errors.append((url, reason))
    return summary
