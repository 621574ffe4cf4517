"""report.html in a real browser: Debian's Chromium, headless, with no network.

The fixture (tests/fixtures/report/) is a real simulation's results.json and truth.json,
unchanged (``fedrwe simulate --sites 3 --patients 9000 --seed 11``, 186 kB). At that size
two sites withheld the matched analysis (events below their minimum cell count), so the
report must show that reason and the first adjusted analysis with an estimate. `make setup` installs
/usr/bin/chromium (Makefile target ``chromium``); without it this test fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request, sync_playwright

from coordinator.report import write_report

FIXTURES = Path(__file__).parent / "fixtures" / "report"
CHROMIUM = "/usr/bin/chromium"
# Flags that work on this project's machines (no GPU, closed network, root): see README.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
]
SECTIONS = ("Summary", "Participation", "Cohort per site", "Attrition", "Results", "Per-site estimates and meta-analysis",
            "Covariate balance: Table 1", "Propensity model", "Kaplan-Meier curves",
            "Proportional hazards check", "Crude Cox model", "Privacy", "Provenance",
            "Planted truth (simulation)", "Approvals", "Rounds", "Software")


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report rendered in Chromium: every request it made, its headings, a screenshot."""
    results, truth = _load("results.json"), _load("truth.json")
    folder = tmp_path_factory.mktemp("report")
    report = folder / "report.html"
    write_report(report, results, truth)
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()

        def record(request: Request) -> None:
            requests.append(request.url)

        page.on("request", record)
        page.goto(report.as_uri(), wait_until="load")
        shown = _shown(page, results)
        screenshot = page.screenshot(full_page=False)
        pdf = page.pdf(format="A4", print_background=True)  # the print stylesheet, on A4
        browser.close()
    return {"results": results, "requests": requests, "screenshot": screenshot, "folder": folder,
            "pdf": pdf, **shown}


def _shown(page: Page, results: dict[str, Any]) -> dict[str, Any]:
    """What the page displays: headings, the keyed numbers, the figures' drawn sizes."""
    keyed = {key: page.locator(f"[data-key='{key}']").inner_text()
             for key in page.eval_on_selector_all("[data-key]", "els => els.map(e => e.dataset.key)")}
    figures = page.eval_on_selector_all(
        "figure svg", "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })")
    return {"headings": page.locator("h2").all_inner_texts(), "keyed": keyed, "figures": figures,
            "title": page.title(), "text": page.locator("body").inner_text()}


def test_every_section_is_present(rendered: dict[str, Any]) -> None:
    assert set(SECTIONS) <= set(rendered["headings"]), set(SECTIONS) - set(rendered["headings"])
    assert rendered["title"] == f"{rendered['results']['study_id']} - fedrwe report"


def test_the_page_made_no_external_request(rendered: dict[str, Any]) -> None:
    assert rendered["requests"], "the page itself must have been requested"
    assert all(url.startswith(("file://", "data:")) for url in rendered["requests"]), rendered["requests"]


def _hr(analysis: dict[str, Any]) -> str:
    return f"{analysis['hr']:.2f} ({analysis['ci_low']:.2f}-{analysis['ci_high']:.2f})"


def test_key_numbers_equal_results_json(rendered: dict[str, Any]) -> None:
    results = rendered["results"]
    analyses = results["analyses"]
    keyed = rendered["keyed"]
    estimated = [name for name, analysis in analyses.items() if "error" not in analysis]
    assert len(estimated) >= 4  # crude and at least three adjusted analyses
    for name in estimated:
        assert keyed[f"hr-{name}"] == _hr(analyses[name]), name
        for field in ("n_exposed", "n_comparator", "events_exposed", "events_comparator"):
            assert keyed[f"{field}-{name}"] == f"{analyses[name][field]:,}", (name, field)
    first_adjusted = next(name for name in estimated if name != "crude")
    assert keyed["headline-hr"] == _hr(analyses[first_adjusted])
    assert keyed["participation-sites"] == ", ".join(results["participation"]["sites"])


def test_a_withheld_analysis_shows_why(rendered: dict[str, Any]) -> None:
    withheld = {name: a["error"] for name, a in rendered["results"]["analyses"].items() if "error" in a}
    assert withheld == {"matched": withheld["matched"]}
    assert "minimum cell count" in withheld["matched"]
    assert "hr-matched" not in rendered["keyed"]
    assert withheld["matched"] in rendered["text"]


def test_figures_are_drawn_and_saved_next_to_the_report(rendered: dict[str, Any]) -> None:
    analyses = [name for name, a in rendered["results"]["analyses"].items() if "km" in a]
    # forest plot, love plot, propensity score distribution, one Kaplan-Meier figure per analysis
    assert len(rendered["figures"]) == 3 + len(analyses)
    assert all(width > 300 and height > 150 for width, height in rendered["figures"])
    saved = sorted(p.name for p in (rendered["folder"] / "figures").iterdir())
    assert saved == sorted(["forest.svg", "love_plot.svg", "propensity.svg",
                            *[f"km_{name}.svg" for name in analyses]])
    for path in (rendered["folder"] / "figures").iterdir():
        assert path.read_text(encoding="utf-8").startswith("<?xml")


def test_screenshot_is_a_png(rendered: dict[str, Any]) -> None:
    assert rendered["screenshot"][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rendered["screenshot"]) > 10_000  # a rendered page, not a blank one


def test_it_prints_on_a4(rendered: dict[str, Any]) -> None:
    assert rendered["pdf"][:5] == b"%PDF-"
    assert b"/MediaBox [0 0 595" in rendered["pdf"]  # A4 is 595 x 842 points


def test_the_request_recorder_sees_an_external_request(tmp_path: Path) -> None:
    """The check above can fail: a page that asks for a remote image is caught (and gets nothing)."""
    page_path = tmp_path / "external.html"
    page_path.write_text("<!doctype html><img src='http://fonts.example.invalid/x.png'>", encoding="utf-8")
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_context(offline=True).new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        browser.close()
    assert "http://fonts.example.invalid/x.png" in requests
