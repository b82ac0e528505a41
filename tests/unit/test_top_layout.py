"""``keel top``'s screen at 80 columns: every table fits, nothing is cut with an ellipsis, figures are whole."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from keel.cli.top import age_text, count_text, rate_text, render
from keel.config import Settings
from keel.observability.overview import Frame, ServiceRow, TenantRow, frame
from tests.unit.test_top_overview import APPROVALS, EFFECTS, PROCESSOR_1, PROCESSOR_2, PROJECTOR, answered

SETTINGS = Settings(topic_prefix="keel")


def screen(view: Frame, width: int = 80, **console: Any) -> str:
    out = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None, **console)
    out.print(render(view, SETTINGS, 2.0))
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def lines_fit(text: str, width: int = 80) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, "\n".join(too_long)
    assert "…" not in text and "..." not in text


def cell(text: str, start: str) -> str:
    """The whole cell that begins with ``start``: its first line and the lines it folded onto."""
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if start in line)
    column = lines[row].index(start)
    pieces = [lines[row][column:].split()[0]]
    for line in lines[row + 1:]:
        if line[:column].strip() or len(line[column:].split()) != 1:  # another row: more than this cell's text
            break
        pieces.append(line[column:].split()[0])
    return "".join(pieces)


def busy_frame() -> Frame:
    """Every section filled, with the longest names the platform publishes."""
    before = [answered("processor", PROCESSOR_1, 100.0, "m1"), answered("approval-watcher", APPROVALS, 100.0),
              answered("effects", EFFECTS, 100.0, "e1")]
    now = [answered("processor", PROCESSOR_2, 102.0, "m1"), answered("approval-watcher", APPROVALS, 102.0),
           answered("effects", EFFECTS, 102.0, "e1"), answered("projector", PROJECTOR, 102.0),
           answered("breaker-watcher", "", 102.0), answered("gateway", "", 102.0, "4194303", pid=4194303)]
    view = frame(now, before)
    down = ServiceRow("chainer", "chainer-instance-with-a-long-name", False, "timeout", None, "records", None)
    wide = TenantRow("tenant-with-a-rather-long-identifier-0001", 12345.6, 987654321.0, 1234567.0, 45.0, 3.0,
                     200_000.0)
    return Frame(**{**vars(view), "services": [*view.services, down], "tenants": [*view.tenants, wide]})


def test_the_busy_screen_fits_80_columns_with_every_figure_whole() -> None:
    text = screen(busy_frame())
    lines_fit(text)
    for whole in ("approval-watcher", "breaker-watcher", "4194303", "DOWN", "timeout", "commands", "10.0",
                  "undecodable 3", "acme/payments", "other/email ×3", "7 held", "events 4s", "5 waiting",
                  "oldest 2d", "987.7M", "12k", "2d"):
        assert whole in text, whole
    # folded, not cut: the long instance and tenant are whole once their cell's lines are joined
    assert cell(text, "chainer-inst") == "chainer-instance-with-a-long-name"
    assert cell(text, "tenant-with") == "tenant-with-a-rather-long-identifier-0001"
    acme = next(line for line in text.splitlines() if line.startswith("acme"))
    assert acme.split() == ["acme", "10.0", "28", "1", "1", "2", "2m"]


def test_no_line_is_wider_than_a_narrower_terminal_and_there_is_no_colour_without_one() -> None:
    narrow = screen(busy_frame(), width=60)  # below 80 names fold and the rightmost figures may be cut
    assert max(len(line) for line in narrow.splitlines()) <= 60
    text = screen(busy_frame())
    assert "\x1b[" not in text  # no escape codes: readable in a pipe, a log, or with NO_COLOR


def test_before_two_scrapes_rates_are_dashes_and_an_empty_platform_says_so() -> None:
    first = frame([answered("processor", PROCESSOR_1, 100.0, "m1")])
    text = screen(first)
    lines_fit(text)
    processor = next(line for line in text.splitlines() if line.startswith("processor"))
    assert processor.split() == ["processor", "m1", "up", "-", "commands", "5"]
    assert "none yet" in screen(frame([answered("relay", "", 100.0)]))  # services, but no command yet
    nothing = screen(frame([]))
    lines_fit(nothing)
    assert "no service publishes metrics under" in nothing and "prefix keel" in nothing


def test_figures_are_short_and_exact_where_it_matters() -> None:
    assert [rate_text(v) for v in (None, 0.0, 2.25, 9999.9, 123456.0)] == ["-", "0.0", "2.2", "9999.9", "123k"]
    assert [count_text(v) for v in (None, 0.0, 999_999.0, 2_500_000.0)] == ["-", "0", "999999", "2.5M"]
    assert [age_text(v) for v in (None, 0.4, 59.0, 60.0, 7200.0, 200_000.0)] == ["-", "0s", "59s", "1m", "2h", "2d"]
