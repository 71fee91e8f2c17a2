"""``embedkit report``: one self-contained HTML page, checked in a real (headless) browser when one is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import invoke_cli, run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _main(*args) -> None:
    from embedkit.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"embedkit {' '.join(map(str, args))} exited {exc.code}"


@pytest.fixture(scope="module")
def study(lite0_store_ro, tmp_path_factory) -> dict:
    """Two probes on the real MitoCheck lite0 store, a CAM folder from one of them, and the report's HTML."""
    root = tmp_path_factory.mktemp("study")
    results = root / "results"
    _main("probe", lite0_store_ro, "--heads", "logreg,knn", "--seeds", "1", "--C", "1e-3,1e-2", "--n-boot", "100", "--out", results, "--quiet")
    _main("explain", results / "logreg", "--store", lite0_store_ro, "--select", "misclassified", "--n", "2",
          "--out", root / "cams")
    out = root / "report.html"
    proc = invoke_cli("report", results, "--store", lite0_store_ro, "--out", out, "--explain", root / "cams",
                      "--method", "pca", "--n-boot", "200", "--mistakes", "2", "--selfcheck", "--quiet")
    return {"root": root, "results": results, "out": out, "html": out.read_text(), "stdout": proc.stdout,
            "store": lite0_store_ro}


def test_page_is_self_contained(study):
    html = study["html"]
    assert "wrote" in study["stdout"] and html.startswith("<!doctype html>")
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # nothing fetched from anywhere
    assert "<link" not in html and not re.search(r"<script[^>]+src=", html)


def test_page_holds_every_section(study):
    from embedkit.report import find_results, load_result
    from embedkit.store import Store

    html = study["html"]
    s = Store(study["store"])
    for cls in sorted(set(s.labels)):
        assert f"<td>{cls}</td>" in html
    names = [load_result(p).record["name"] for p in find_results([study["results"]])]
    for name in names:
        assert name in html
    assert "chance (16 classes)" in html and "0.062" in html  # 1/16 balanced accuracy
    # Against the best row the table gives the group-bootstrap p of the paired table, not McNemar's item count.
    shown = re.findall(r"\], p=([^<]+)</td>", html)
    paired = re.findall(r"<td>([^<]*)</td><td>\d+ / \d+</td><td>([^<]*)</td>", html)  # p (group bootstrap), McNemar p
    assert len(shown) == len(names) - 1 and len(paired) == len(shown)
    assert sorted(shown) == sorted(boot for boot, _ in paired)
    assert re.search(r'class="verdict (clean|leak)"', html)  # the leak check ran and gave its verdict
    assert "coloured by label" in html and "coloured by correctness" in html
    assert "misclassified cells of" in html and 'id="cams"' in html
    cfg = s.config(s.keys[0])
    assert cfg["weights_fingerprint"] in html and "embedkit report" in html
    assert html.count("confusion") >= 2 and html.count(": roc") >= 2


def test_bad_input_is_one_line(study, tmp_path):
    proc = run_cli("report", tmp_path, "--store", study["store"], "--out", tmp_path / "r.html", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no result folders" in proc.stderr
    assert not (tmp_path / "r.html").exists()


def test_renders_in_headless_chromium_without_errors(study):
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium): the page was not rendered in a browser")
    url = study["out"].resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, "console messages:\n" + "\n".join(console)
    m = re.search(r'<div id="ek-selfcheck"[^>]*>([^<]*)</div>', dom.stdout)
    assert m, "the page's self-check did not run (script error or page not loaded)"
    status = json.loads(m.group(1).replace("&quot;", '"'))
    assert status["images"] >= 8 and status["broken"] == [] and status["errors"] == []
    shot = study["root"] / "report.png"
    subprocess.run(flags + ["--hide-scrollbars", "--window-size=1400,3000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 3000) and len(set(im.convert("L").resize((64, 64)).getdata())) > 20
