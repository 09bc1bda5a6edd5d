"""The build report page, opened in a real headless browser as a person would open it."""
from __future__ import annotations

import stat

import pytest
from click.testing import CliRunner

from browser import console_errors, headless_chrome, screenshot
from edgepack.cli import main

pytestmark = pytest.mark.slow


_LABELS_JS = """return [...document.querySelectorAll('svg.chart')].map(svg => {
  const w = svg.viewBox.baseVal.width, boxes = [...svg.querySelectorAll('text.pt-label')].map(t => t.getBBox());
  let overlaps = 0;
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height) overlaps++;
  }
  const ticks = [...svg.querySelectorAll('text.ytick')];
  const axis = [...svg.querySelectorAll('line')][1];
  return {chart: svg.dataset.chart, overlaps, clipped: boxes.filter(b => b.x < 0 || b.x + b.width > w).length,
          ticks: ticks.map(t => t.textContent), topTick: Math.min(...ticks.map(t => t.getBBox().y + t.getBBox().height / 2)),
          axisTop: Number(axis.getAttribute('y1'))};
})"""


def test_build_report_page(tabular, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["build", str(tabular["model"]), "-t", "arm-cpu", "-t", "x86-cpu", "-t",
                                    "jetson-gpu", "-t", "coral", "--calibration", str(tabular["calibration"]),
                                    "--validation", str(tabular["validation"]), "--name", "tab", "-o",
                                    str(tmp_path / "dist"), "--html", str(page)])
    assert res.exit_code == 4, res.output  # Coral (int8 only) fails the gate; the page is written anyway
    assert f"report: {page}" in res.output and stat.S_IMODE(page.stat().st_mode) == 0o644
    assert "http://" not in page.read_text() and "<script" not in page.read_text()  # nothing fetched, nothing run
    with headless_chrome() as d:
        d.get(page.as_uri())
        assert d.title == "edgepack build report: tabular.keras"
        assert console_errors(d) == []
        pts = d.find_elements(By.CSS_SELECTOR, "svg[data-chart=targets] circle.pt")
        assert {p.get_attribute("data-target") for p in pts} == {"fp32", "arm-cpu", "x86-cpu"}
        # arm-cpu: plain int8 far down the accuracy axis, the chosen candidate near fp32
        size = {p.get_attribute("data-candidate"): p for p in
                d.find_elements(By.CSS_SELECTOR, "svg[data-chart=size-arm-cpu] circle.pt")}
        assert size["int8"].get_attribute("data-verdict") == "accuracy" and float(size["int8"].get_attribute("data-y")) > 10
        chosen = [p for p in size.values() if p.get_attribute("data-verdict") == "chosen"]
        assert len(chosen) == 1 and float(chosen[0].get_attribute("data-y")) <= 1.0
        lat = d.find_elements(By.CSS_SELECTOR, "svg[data-chart=latency-arm-cpu] circle.pt")
        assert any(p.get_attribute("data-verdict") == "chosen" for p in lat)
        assert d.find_elements(By.CSS_SELECTOR, "svg[data-chart=size-jetson-gpu] circle.pt")
        assert not d.find_elements(By.CSS_SELECTOR, "svg[data-chart=latency-jetson-gpu]")  # GPU: not timed here
        coral = d.find_element(By.ID, "coral").find_element(By.XPATH, "following-sibling::p[1]").text
        assert "failed (AccuracyGateError)" in coral
        bars = d.find_elements(By.CSS_SELECTOR, "svg.sens rect.bar")
        assert bars and any("norm" in b.get_attribute("data-name") for b in bars)
        # issue 24, finding 8: point labels neither overlap nor run off a chart; the y axis' ticks are
        # round steps and the top one is the axis' top (it read 1.1 on an axis to 1.15)
        for c in d.execute_script(_LABELS_JS):
            assert c["overlaps"] == 0 and c["clipped"] == 0, c
            ticks = [float(v) for v in c["ticks"]]
            assert ticks[0] == 0 and all(abs((b - a) - ticks[1]) < 1e-9 for a, b in zip(ticks, ticks[1:])), c
            assert abs(c["topTick"] - c["axisTop"]) <= 3, c  # the top label sits at the top of the axis
        shot = screenshot(d, "build-report.png")
    assert shot.stat().st_size > 20_000
