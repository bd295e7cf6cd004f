"""Tests of kspec_fluxcal.download against a local HTTP server (no outside network)."""

from __future__ import annotations

import gzip
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kspec_fluxcal import cli
from kspec_fluxcal.download import (
    MAST_BASE_URL,
    DownloadSummary,
    bosz_filename,
    bosz_subgrid,
    download_grid,
    subgrid_urls,
)
from kspec_fluxcal.errors import DownloadError

FAST = {"backoff": 0.01, "timeout": 5.0, "progress": False}

POINTS = [
    {"atmos": "mp", "teff": 6000, "logg": 4.0, "feh": 0.0, "alpha": 0.0},
    {"atmos": "mp", "teff": 6250, "logg": 4.5, "feh": 0.0, "alpha": 0.0},
    {"atmos": "mp", "teff": 5500, "logg": 3.5, "feh": -0.5, "alpha": 0.25},
    {"atmos": "mp", "teff": 7000, "logg": 4.0, "feh": 0.25, "alpha": 0.0},
]


def _spectrum_bytes(seed: int, rows: int = 200) -> bytes:
    text = "".join(f"{1e5 + seed + i:.7E} {2e5 + seed:.7E}\n" for i in range(rows))
    return gzip.compress(text.encode(), mtime=0)


class FakeMast:
    """Files by URL path, a per-path queue of misbehaviours, and a count of requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.base_url = ""

    def publish(self, points=POINTS, resolution="r10000"):
        """Serve a small grid; return the (url, relative path) jobs and each file's bytes."""
        jobs = subgrid_urls(self.base_url, resolution, points=points)
        content = {}
        for k, (url, rel) in enumerate(jobs):
            if rel.name.endswith(".gz"):
                body = _spectrum_bytes(k)
            else:
                body = "".join(f"{500.0 * 1.0001**i:.7E}\n" for i in range(200)).encode()
            self.files[urlsplit(url).path] = body
            content[rel] = body
        return jobs, content

    def plan(self, url: str, *behaviours: str) -> None:
        self.plans[urlsplit(url).path] = list(behaviours)

    def hits_for(self, url: str) -> int:
        return self.hits[urlsplit(url).path]

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())


def _handler(state: FakeMast):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the server closes the connection after each response, so a short body
        # under a longer Content-Length reaches the client as an early close.
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):  # noqa: N802 (http.server API)
            path = self.path
            with state.lock:
                state.hits[path] += 1
                queue = state.plans.get(path)
                behaviour = queue.pop(0) if queue else "ok"
            body = state.files.get(path)
            if behaviour == "404" or body is None:
                self.send_error(404)
            elif behaviour == "500":
                self.send_error(500)
            elif behaviour == "403":
                self.send_error(403)
            elif behaviour == "truncate":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
            elif behaviour == "badgzip":
                cut = body[: len(body) // 2]  # Content-Length matches: only gzip can tell
                self.send_response(200)
                self.send_header("Content-Length", str(len(cut)))
                self.end_headers()
                self.wfile.write(cut)
            else:
                self.send_response(200)
                if behaviour != "nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    return Handler


@pytest.fixture
def mast():
    state = FakeMast()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


# --- names and URLs ----------------------------------------------------------------------


def test_filename_literal():
    assert (
        bosz_filename("mp", 6000, 4.0, 0.0, 0.0)
        == "bosz2024_mp_t6000_g+4.0_m+0.00_a+0.00_c+0.00_v1_r10000_resam.txt.gz"
    )
    assert (
        bosz_filename("ap", 7750.0, 3.5, -0.75, 0.25, carbon=-0.5, vmicro=2, resolution="r2000")
        == "bosz2024_ap_t7750_g+3.5_m-0.75_a+0.25_c-0.50_v2_r2000_resam.txt.gz"
    )
    # -0.0 must not become "m-0.00", a directory and file that do not exist at MAST.
    assert "_m+0.00_a+0.00_c+0.00_" in bosz_filename("mp", 6000, 4.0, -0.0, -0.0, carbon=-0.0)


def test_filename_rejects_bad_arguments():
    with pytest.raises(ValueError, match="r10000"):
        bosz_filename("mp", 6000, 4.0, 0.0, 0.0, resolution="r12345")
    with pytest.raises(ValueError, match="teff"):
        bosz_filename("mp", 6000.5, 4.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="atmosphere"):
        bosz_filename("xx", 6000, 4.0, 0.0, 0.0)


def test_subgrid_contents():
    points = bosz_subgrid()
    assert len(points) == 520
    names = {bosz_filename(**p) for p in points}
    assert len(names) == 520
    assert {p["teff"] for p in points} == set(range(5000, 8001, 250))
    assert {p["logg"] for p in points} == {3.5, 4.0, 4.5, 5.0}
    assert {p["atmos"] for p in points} == {"mp"}
    enhanced = {p["feh"] for p in points if p["alpha"] == 0.25}
    assert enhanced == {-1.0, -0.75, -0.5}
    assert sum(p["alpha"] == 0.0 for p in points) == 7 * 52


def test_invalid_resolution_names_choices():
    with pytest.raises(ValueError, match="r500.*rorig"):
        bosz_subgrid("r12345")
    with pytest.raises(ValueError, match="valid choices"):
        subgrid_urls(resolution="R10000")


def test_subgrid_urls_real_layout():
    jobs = subgrid_urls()
    assert len(jobs) == 521
    assert len({url for url, _ in jobs}) == 521
    assert jobs[0] == (
        "https://archive.stsci.edu/hlsps/bosz/bosz2024/wavelength_grids/bosz2024_wave_r10000.txt",
        Path("bosz2024_wave_r10000.txt"),
    )
    name = "bosz2024_mp_t5250_g+3.5_m-0.75_a+0.25_c+0.00_v1_r10000_resam.txt.gz"
    url = f"https://archive.stsci.edu/hlsps/bosz/bosz2024/r10000/m-0.75/{name}"
    assert (url, Path("r10000", "m-0.75", name)) in jobs
    assert all(u.startswith(MAST_BASE_URL + "/hlsps/bosz/bosz2024/") for u, _ in jobs)
    assert {rel.parts[1] for _, rel in jobs[1:]} == {
        "m-1.00",
        "m-0.75",
        "m-0.50",
        "m-0.25",
        "m+0.00",
        "m+0.25",
        "m+0.50",
    }


def test_points_must_match_resolution():
    with pytest.raises(ValueError, match="r2000"):
        subgrid_urls(points=[dict(POINTS[0], resolution="r2000")])


def test_summary_str():
    s = DownloadSummary(ok=[Path("a")] * 400, skipped=[Path("b")] * 100, not_found=["u"] * 20)
    assert str(s) == "520 files: 400 ok, 100 skipped, 20 not found, 0 errors"
    s.errors.append(("http://x/y", "HTTP 403 Forbidden"))
    assert str(s).startswith("521 files: 400 ok, 100 skipped, 20 not found, 1 error;")
    assert "http://x/y: HTTP 403 Forbidden" in str(s)


def test_mostly_missing_is_a_failed_download_not_holes(mast, tmp_path, capsys, monkeypatch):
    """Every spectrum answered 404 (names the server does not have) was summarised as holes,
    and `grid download` exited 0; the user met it only at `grid build`."""
    jobs, _ = mast.publish()
    for url, _ in jobs[1:]:  # the spectra; the wavelength file is there
        mast.plan(url, "404")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    assert summary.mostly_missing and summary.errors == []
    assert "most files not found, more than the grid's holes" in str(summary)
    assert not DownloadSummary(ok=[Path("a")] * 500, not_found=["u"] * 20).mostly_missing
    # The command's status says so.
    monkeypatch.setattr("kspec_fluxcal.download.download_grid", lambda *a, **k: summary)
    assert cli.main(["grid", "download", "--out", str(tmp_path / "x")]) == 1
    assert "most files not found" in capsys.readouterr().out


# --- downloads ---------------------------------------------------------------------------


def test_full_download_layout_and_content(mast, tmp_path):
    jobs, content = mast.publish()
    out = tmp_path / "grid"
    summary = download_grid(out, base_url=mast.base_url, points=POINTS, **FAST)
    assert str(summary) == "5 files: 5 ok, 0 skipped, 0 not found, 0 errors"
    assert sorted(summary.ok) == sorted(out / rel for _, rel in jobs)
    assert (out / "bosz2024_wave_r10000.txt").read_bytes() == content[
        Path("bosz2024_wave_r10000.txt")
    ]
    name = "bosz2024_mp_t5500_g+3.5_m-0.50_a+0.25_c+0.00_v1_r10000_resam.txt.gz"
    got = out / "r10000" / "m-0.50" / name
    assert got.read_bytes() == content[Path("r10000", "m-0.50", name)]
    with gzip.open(got, "rt") as fh:
        assert len(fh.readline().split()) == 2
    assert mast.total_hits == 5
    assert _leftovers(out) == []


def test_not_found_is_not_retried(mast, tmp_path):
    jobs, _ = mast.publish()
    url, rel = jobs[2]
    mast.plan(url, "404", "404", "404", "404")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, retries=3, **FAST)
    assert summary.not_found == [url]
    assert mast.hits_for(url) == 1
    assert not (tmp_path / rel).exists()
    assert summary.counts["ok"] == 4 and summary.errors == []


@pytest.mark.parametrize("index", [0, 1], ids=["wavelength-txt", "spectrum-gz"])
def test_truncated_transfer_retried_then_error(mast, tmp_path, index):
    jobs, _ = mast.publish()
    url, rel = jobs[index]
    mast.plan(url, *["truncate"] * 10)
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, retries=2, **FAST)
    assert [u for u, _ in summary.errors] == [url]
    assert "truncated" in summary.errors[0][1]
    assert mast.hits_for(url) == 3  # first attempt + 2 retries
    assert not (tmp_path / rel).exists()
    assert _leftovers(tmp_path) == []
    assert len(summary.ok) == 4


def test_corrupt_gzip_with_matching_length_is_rejected(mast, tmp_path):
    jobs, _ = mast.publish()
    url, rel = jobs[3]
    mast.plan(url, *["badgzip"] * 10)
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, retries=1, **FAST)
    assert [u for u, _ in summary.errors] == [url]
    assert "gzip" in summary.errors[0][1]
    assert mast.hits_for(url) == 2
    assert not (tmp_path / rel).exists()
    assert _leftovers(tmp_path) == []


def test_transient_500_then_ok(mast, tmp_path):
    jobs, content = mast.publish()
    url, rel = jobs[4]
    mast.plan(url, "500")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, retries=3, **FAST)
    assert summary.errors == [] and len(summary.ok) == 5
    assert mast.hits_for(url) == 2
    assert (tmp_path / rel).read_bytes() == content[rel]


def test_client_error_is_not_retried(mast, tmp_path):
    jobs, _ = mast.publish()
    url, _ = jobs[1]
    mast.plan(url, "403", "403")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, retries=3, **FAST)
    assert summary.errors == [(url, "HTTP 403 Forbidden")]
    assert mast.hits_for(url) == 1


def test_no_content_length_still_verified_by_gzip(mast, tmp_path):
    jobs, content = mast.publish()
    url, rel = jobs[1]
    mast.plan(url, "nolength")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    assert len(summary.ok) == 5
    assert (tmp_path / rel).read_bytes() == content[rel]


def test_rerun_skips_and_force_refetches(mast, tmp_path):
    jobs, _ = mast.publish()
    download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    assert mast.total_hits == 5

    again = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    assert str(again) == "5 files: 0 ok, 5 skipped, 0 not found, 0 errors"
    assert mast.total_hits == 5  # no request at all for complete files

    url, rel = jobs[1]
    newer = _spectrum_bytes(99)
    mast.files[urlsplit(url).path] = newer
    forced = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, force=True, **FAST)
    assert len(forced.ok) == 5 and forced.skipped == []
    assert mast.total_hits == 10
    assert (tmp_path / rel).read_bytes() == newer


def test_damaged_local_file_is_not_skipped(mast, tmp_path):
    jobs, content = mast.publish()
    download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    _, rel = jobs[2]
    dest = tmp_path / rel
    dest.write_bytes(content[rel][: len(content[rel]) // 2])  # truncated after the fact
    empty = tmp_path / jobs[0][1]
    empty.write_bytes(b"")
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    assert sorted(summary.ok) == sorted([dest, empty])
    assert len(summary.skipped) == 3
    assert dest.read_bytes() == content[rel]


def test_dry_run_makes_no_request(mast, tmp_path, capsys):
    jobs, _ = mast.publish()
    out = tmp_path / "not-yet"
    summary = download_grid(out, base_url=mast.base_url, points=POINTS, dry_run=True, **FAST)
    assert mast.total_hits == 0
    assert [u for u, _ in summary.to_fetch] == [u for u, _ in jobs]
    assert [d for _, d in summary.to_fetch] == [out / rel for _, rel in jobs]
    assert not out.exists()
    assert "dry run" in str(summary) and "5 to fetch" in str(summary)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_dry_run_reports_complete_files_as_skipped(mast, tmp_path):
    jobs, _ = mast.publish()
    download_grid(tmp_path, base_url=mast.base_url, points=POINTS, **FAST)
    (tmp_path / jobs[1][1]).unlink()
    hits = mast.total_hits
    summary = download_grid(tmp_path, base_url=mast.base_url, points=POINTS, dry_run=True, **FAST)
    assert summary.to_fetch == [(jobs[1][0], tmp_path / jobs[1][1])]
    assert len(summary.skipped) == 4
    assert mast.total_hits == hits


def test_progress_goes_to_stderr_only_when_asked(mast, tmp_path, capsys):
    mast.publish()
    opts = dict(FAST, progress=True)
    download_grid(tmp_path / "a", base_url=mast.base_url, points=POINTS, **opts)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "5/5 (100%)" in captured.err

    download_grid(tmp_path / "b", base_url=mast.base_url, points=POINTS, **FAST)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unwritable_output_raises_download_error(mast, tmp_path):
    mast.publish()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DownloadError, match="a-file"):
        download_grid(blocker, base_url=mast.base_url, points=POINTS, **FAST)
    assert mast.total_hits == 0


def test_connection_refused_is_an_error_not_a_crash(tmp_path):
    # A port just released by the OS has no listener: connection refused, which is retried.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    summary = download_grid(
        tmp_path, base_url=f"http://127.0.0.1:{port}", points=POINTS[:1], retries=1, **FAST
    )
    assert len(summary.errors) == 2 and summary.ok == []
    assert all("gave up after 2 attempts" in reason for _, reason in summary.errors)
    assert _leftovers(tmp_path) == []
