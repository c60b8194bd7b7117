"""The one-page HTML report: every suite, its claims and its images, self-contained."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from normkit.bench import SUITES, Job, configure_parser, register_suite, run_cli
from normkit.bench.models import SmallCNN
from normkit.bench.report import parse_claim, write_html
from normkit.bench.runner import report_sections
from normkit.bench.verdict import format_claim, paired_verdict

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)  # a 1×1 PNG


def _line(label_diffs):
    return format_claim("Src 2020", "A beats B", paired_verdict(label_diffs), paper="ImageNet", ours="scenes: A 80%, B 70%")


def test_parse_claim_reads_every_field():
    c = parse_claim(_line([0.1, 0.12, 0.11]))
    assert c == {
        "label": "supported", "source": "Src 2020", "claim": "A beats B", "paper": "ImageNet",
        "ours": "scenes: A 80%, B 70%", "delta": "+11.0 pt [+8.5, +13.5] 95% CI, 3 seeds",
    }  # fmt: skip
    assert parse_claim("    note: BN barely suffers") == {"note": "note: BN barely suffers"}


def test_html_has_every_suite_claims_and_embedded_images(tmp_path):
    img = tmp_path / "results.png"
    img.write_bytes(PNG)
    sections = [
        {"suite": "alpha", "description": "first", "scope": "ImageNet depth", "claims": [_line([0.1, 0.12, 0.11]), "  note: n"],
         "leaderboard": [], "images": [img], "env": {"seeds": [0, 1, 2]}},
        {"suite": "beta", "description": "second", "claims": [_line([-0.1, -0.12, -0.11]), _line([0.1, -0.1])],
         "leaderboard": [], "images": [], "env": {}},
    ]  # fmt: skip
    html = write_html(tmp_path / "report.html", sections).read_text()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "id='alpha'" in html and "id='beta'" in html
    assert html.count("data:image/png;base64,") == 1 and base64.b64encode(PNG).decode() in html
    assert "class='supported'" in html and "class='contradicted'" in html and "class='inconclusive'" in html
    assert "Cannot show: ImageNet depth" in html and "3 paired seeds" in html
    assert 'src="http' not in html and "<script" not in html  # self-contained, nothing fetched


class _TinyNet(SmallCNN):
    def __init__(self, norm: str) -> None:
        super().__init__(norm, width=4)


def test_cli_report_runs_the_suites_and_writes_one_page(tmp_path):
    name = "test-report-toy"
    jobs = [Job("digits", "cnn", n, _TinyNet, 64, 0.05, 1e-2) for n in ("batchnorm", "groupnorm")]

    def claims(results):
        return [_line([0.1, 0.12, 0.11])]

    register_suite(name, description="toy for the report", claims=claims, seeds=2, scope="anything")(lambda cfg: jobs)
    try:
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        args = parser.parse_args(["--suite", name, "--report", "--out", str(tmp_path), "--no-progress"])
        assert run_cli(args) == 0
    finally:
        SUITES.pop(name)
    html = (tmp_path / "report.html").read_text()
    assert f"id='{name}'" in html and "toy for the report" in html and "Src 2020" in html
    payload = json.loads((tmp_path / name / "results.json").read_text())
    assert [r["seed"] for r in payload["runs"]] == [0, 1, 0, 1] and payload["scope"] == "anything"
    pngs = sorted(p.name for p in (tmp_path / name).glob("*.png"))
    assert pngs == ["curves.png", "results.png"] and html.count("data:image/png;base64,") == 2
    assert [s["suite"] for s in report_sections(tmp_path, [name, "missing"])] == [name]


def _chromium() -> str | None:
    for exe in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = shutil.which(exe)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine")
def test_report_renders_in_headless_chromium(tmp_path):
    img = tmp_path / "results.png"
    img.write_bytes(PNG)
    page = write_html(tmp_path / "report.html", [{"suite": "alpha", "claims": [_line([0.1, 0.12, 0.11])], "images": [img]}])
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900",
           Path(page).as_uri()]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000  # a rendered page, not blank
