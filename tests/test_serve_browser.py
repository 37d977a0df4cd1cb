"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from hyads import HyADS
from hyads.data import load_dataset
from hyads.serve import ServiceSettings, create_app

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("Debian chromium/chromium-driver not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server_url(bottle, tmp_path_factory):
    import socket

    import uvicorn

    ds = load_dataset(bottle)
    model = HyADS(seed=0)
    model.progress = False
    path = model.fit(ds.train[::4]).save(tmp_path_factory.mktemp("web") / "model")
    app = create_app(ServiceSettings(model_path=path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_upload_real_defect_image_shows_verdict(browser, server_url, bottle):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "bank"))
    defect = sorted((bottle / "test" / "broken_large").iterdir())[0]
    browser.find_element(By.ID, "file").send_keys(str(defect))
    wait.until(EC.text_to_be_present_in_element((By.ID, "verdict"), "defect"))
    assert browser.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png;base64,")
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    assert len(rows) == 1 and defect.name in rows[0].text
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "web_page_defect.png"))

    # The threshold slider re-colours verdicts in the page, without a new request. Done on a normal image: a
    # clear defect's normalised score can sit at 1.00, the top of the slider, where no threshold is above it.
    good = sorted((bottle / "test" / "good").iterdir())[0]
    browser.execute_script("document.getElementById('file').value = '';")  # else no change event
    browser.find_element(By.ID, "file").send_keys(str(good))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 2)
    score = float(browser.find_element(By.ID, "score").text)
    assert score < 0.99, score

    def slide(value: float) -> str:
        browser.execute_script(
            "const s = document.getElementById('threshold'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('input'));", value)
        return browser.find_element(By.ID, "verdict").text

    assert slide(max(0.0, score - 0.01)) == "defect"
    assert slide(min(1.0, score + 0.01)) == "normal"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 2  # no new request
