"""``dast report``: one self-contained HTML page describing a run directory.

:func:`render_report` returns the page, :func:`write_report` writes it atomically. The
page works for a finished or an unfinished run and says what an unfinished one lacks.
:func:`write_demo_report` does the same for a ``dast demo`` output folder, and
:func:`write_runs_report` writes one comparison table over every run directory below a folder.
"""

from dast.reporting.demo_page import is_demo_folder, write_demo_report
from dast.reporting.page import render_report, write_report
from dast.reporting.rundir import RunContents, read_run
from dast.reporting.runs_page import is_runs_folder, write_runs_report

__all__ = [
    "RunContents",
    "is_demo_folder",
    "is_runs_folder",
    "read_run",
    "render_report",
    "write_demo_report",
    "write_report",
    "write_runs_report",
]
