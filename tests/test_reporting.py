"""How the test suite reports (issue 16: `pytest -q` printed property-test statistics and the
kill test's progress, past pytest's capture)."""

from __future__ import annotations

from pathlib import Path


def test_report_lines_only_with_verbose_or_no_capture(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_x='def test_a(report_line):\n    report_line("42 examples: ok 40")\n')
    quiet = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    quiet.assert_outcomes(passed=1)
    assert "42 examples" not in quiet.stdout.str()
    for option in ("-v", "-s"):
        loud = pytester.runpytest_inprocess(option, "-p", "no:cacheprovider")
        loud.assert_outcomes(passed=1)
        assert "42 examples: ok 40" in loud.stdout.str(), option
