"""The upload page in a real browser: Debian's headless chromium, driven through chromium-driver
by Selenium, against a real `bentoml serve` of the shipped model."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from serving.page import SAMPLES

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "nin-fashion-mnist"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        message = "chromium and chromium-driver are not installed (make setup installs them from Debian)"
        if os.environ.get("CI") or os.environ.get("NIN_EXPECT_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1300"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # explicit paths: nothing is downloaded
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shipped_server():
    from bench.servers import running_server

    with running_server(SHIPPED) as proc:
        yield proc.url


def wait_for_card(driver, index: int, timeout: float = 30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    card = WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, f"result-{index}"))
    WebDriverWait(driver, timeout).until(lambda d: card.get_attribute("data-state") in ("done", "error"))
    return card


def test_upload_page_in_chromium(browser, shipped_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{shipped_server}/ui")
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples button")) >= 4)
    WebDriverWait(browser, 20).until(lambda d: "variant on" in d.find_element(By.ID, "model").text)

    # 1. a real Fashion-MNIST test image, chosen through the file input
    image = SAMPLES / "test0001-pullover.png"
    browser.find_element(By.ID, "files").send_keys(str(image))
    card = wait_for_card(browser, 0)
    assert card.get_attribute("data-state") == "done", card.text
    api = httpx.post(f"{shipped_server}/classify?top_k=10", files={"image": (image.name, image.read_bytes(), "image/png")}).json()
    shown = card.find_element(By.CSS_SELECTOR, '[data-testid="class-name"]').text
    assert shown == api["class_name"] == "Pullover"
    bars = card.find_elements(By.CSS_SELECTOR, '[data-testid="bar"]')
    assert len(bars) == 10 and bars[0].text.startswith(api["top_k"][0]["class_name"])
    seen = card.find_element(By.CSS_SELECTOR, "img.seen")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", seen) == [224, 224]
    assert card.find_element(By.CSS_SELECTOR, '[data-testid="model"]').text == f"{api['model']['variant']} on {api['model']['provider']}"
    assert "inference (ms)" in card.text and "peak RSS (MB)" in card.text

    # 2. a file that is not an image: the 4xx shown as a clear message
    bogus = tmp_path / "holiday.png"
    bogus.write_text("these are my holiday notes, not a picture")
    browser.find_element(By.ID, "files").send_keys(str(bogus))
    card = wait_for_card(browser, 1)
    assert card.get_attribute("data-state") == "error"
    assert card.find_element(By.CSS_SELECTOR, '[data-testid="error"]').text == "not_an_image (HTTP 400)"
    assert "no image decoder recognises" in card.find_element(By.CSS_SELECTOR, '[data-testid="error-detail"]').text

    # 3. a sample, one click away
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="test0000-ankle-boot.png"]').click()
    card = wait_for_card(browser, 2)
    assert card.find_element(By.CSS_SELECTOR, '[data-testid="class-name"]').text == "Ankle boot"

    shot = tmp_path / "ui.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("NIN_UI_SCREENSHOT"):  # README's picture: NIN_UI_SCREENSHOT=docs/ui.png pytest tests/test_browser.py
        shutil.copy(shot, os.environ["NIN_UI_SCREENSHOT"])

    # 4. phone width: nothing wider than the screen
    browser.set_window_size(390, 844)
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width


@pytest.fixture(scope="module")
def keyed_server(served_model):
    from bench.servers import running_server

    with running_server(served_model, {"NIN_API_KEYS": KEY}) as proc:
        yield proc.url


KEY = "browser-test-key-0123456789"


def test_page_and_swagger_work_with_an_api_key(browser, keyed_server):
    """With NIN_API_KEYS set: the page shows its key field after the 401 and classifies once a key
    is typed; Swagger UI's Authorize button takes the key and its calls then succeed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1200, 1300)
    browser.get(f"{keyed_server}/ui")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "key-row").is_displayed())
    assert "needs an API key" in browser.find_element(By.ID, "model").text
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="test0000-ankle-boot.png"]').click()
    card = wait_for_card(browser, 0)
    assert card.find_element(By.CSS_SELECTOR, '[data-testid="error"]').text == "missing_api_key (HTTP 401)"
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)  # a change event
    WebDriverWait(browser, 20).until(lambda d: "variant on" in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="test0000-ankle-boot.png"]').click()
    assert wait_for_card(browser, 1).get_attribute("data-state") == "done"

    browser.get(keyed_server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.authorize"))[0].click()
    modal = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, ".auth-container input"))
    modal.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, ".auth-container button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, "button.btn-done").click()
    op = browser.find_element(By.CSS_SELECTOR, '.opblock-summary-path[data-path="/model"]')
    op.click()
    block = op.find_element(By.XPATH, "./ancestor::div[contains(@class, 'opblock ')]")
    WebDriverWait(block, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, "button.try-out__btn")).click()
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = WebDriverWait(block, 20).until(lambda b: b.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
    assert status.text.strip().startswith("200"), block.text[-2000:]
