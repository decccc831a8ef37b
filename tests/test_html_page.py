"""The results page in a real headless browser (Debian's chromium, driven by Selenium through
chromedriver; .ci/run installs them, a machine without them skips): it loads without console
errors, sorting a column reorders its rows, a filter hides rows, every image decodes to a picture
that is not blank, and a screenshot is saved (RESULTS_ARTIFACTS, default results/test-artifacts)."""
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium / chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory, plugin_path):
    """The page of the committed canonical CPU baseline, plus a small run of this machine (its
    figures: the baseline keeps its rows but not its samples)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("page")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    run = tmp / "run"
    r = subprocess.run([sys.executable, "-m", "genbench.cli", "run", "--models", "gauss-paths", "--datasets",
                        "ring8,moons", "--n-samples", "300", "--floor-draws", "2", "--out", str(run)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp / "page.html"
    r = subprocess.run([sys.executable, "-m", "genbench.cli", "report", str(ROOT / "baselines" / "cpu"), str(run),
                        "--format", "html", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def test_the_page_is_one_self_contained_file(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script>" in text and "data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network


def test_the_page_in_a_browser(browser, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(page.as_uri())
    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe

    table = browser.find_elements(By.CSS_SELECTOR, "table.results")[0]
    heads = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    col = heads.index("w2")
    body = table.find_elements(By.CSS_SELECTOR, "tbody")[0]

    def column():
        return [tr.find_elements(By.TAG_NAME, "td")[col].text for tr in body.find_elements(By.CSS_SELECTOR, "tr")]

    def key(t):
        return float(t.rstrip("†").split()[0])

    before = column()
    table.find_elements(By.CSS_SELECTOR, "thead th")[col].click()
    ascending = column()
    assert ascending[0] == before[0]  # the data's floor row stays first
    assert [key(v) for v in ascending[1:]] == sorted(key(v) for v in before[1:])
    table.find_elements(By.CSS_SELECTOR, "thead th")[col].click()
    assert [key(v) for v in column()[1:]] == sorted((key(v) for v in before[1:]), reverse=True)

    shown = lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "table.results tbody") if b.is_displayed()]  # noqa: E731
    all_bodies = len(shown())
    Select(browser.find_element(By.ID, "f-dataset")).select_by_value("moons")
    assert 0 < len(shown()) < all_bodies
    assert {b.get_attribute("data-dataset") for b in shown()} == {"moons"}
    Select(browser.find_element(By.ID, "f-model")).select_by_value("vae")
    visible = [tr for b in shown() for tr in b.find_elements(By.CSS_SELECTOR, "tr:not(.floor)") if tr.is_displayed()]
    assert visible and {tr.get_attribute("data-model") for tr in visible} == {"vae"}
    Select(browser.find_element(By.ID, "f-dataset")).select_by_value("")
    Select(browser.find_element(By.ID, "f-model")).select_by_value("")

    images = browser.execute_script("""
        return Array.from(document.images).map(function (img) {
          var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
          var g = c.getContext('2d'); g.drawImage(img, 0, 0);
          var d = g.getImageData(0, 0, c.width, c.height).data, seen = {}, n = 0;
          for (var i = 0; i < d.length; i += 4 * 97) { var k = d[i] + ',' + d[i + 1] + ',' + d[i + 2];
            if (!seen[k]) { seen[k] = 1; n++; } }
          return [img.complete, img.naturalWidth, img.naturalHeight, n];
        });""")
    assert images and all(ok and w > 100 and h > 100 and colours > 4 for ok, w, h, colours in images), images

    artefacts = Path(os.environ.get("RESULTS_ARTIFACTS", ROOT / "results" / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "html_page.png"
    browser.set_window_size(1400, 1800)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
