"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): a user enters the API key, picks the base on the left and an adapter on the right, and
both answers stream in; each equals what the API gives the `openai` client for the same
conversation, over two turns. A screenshot is kept in test-artifacts/ (or $LORAFIT_TEST_ARTIFACTS).

Skipped where Chromium is not installed, unless LORAFIT_BROWSER=1 (CI sets it, and
scripts/setup.sh installs the browser then): there a missing browser is a failure."""

import os
import shutil
from pathlib import Path

import pytest

from helpers import SERVE_KEY, ServerThread
from lorafit.serve.app import create_app

KEY = SERVE_KEY
NEW_TOKENS = 20


def _browser_paths():
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chrome and driver:
        return chrome, driver
    if os.environ.get("LORAFIT_BROWSER") == "1":
        pytest.fail("LORAFIT_BROWSER=1 but chromium / chromedriver are not installed")
    pytest.skip(
        "needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    )


@pytest.fixture(scope="module")
def browser():
    chrome, driver_path = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(serve_registry):
    srv = ServerThread(create_app(serve_registry(), api_key=KEY, max_tokens=64))
    yield srv
    srv.stop()


def _api_answer(server, model, history):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    out = client.chat.completions.create(
        model=model, messages=history, max_tokens=NEW_TOKENS, temperature=0
    )
    return out.choices[0].message.content


def _artifacts() -> Path:
    root = os.environ.get("LORAFIT_TEST_ARTIFACTS")
    folder = Path(root) if root else Path(__file__).resolve().parents[2] / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_two_models_answer_side_by_side_in_a_real_browser(browser, server, files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    # no key yet: the page asks for one
    wait.until(ready.visibility_of_element_located((By.ID, "key")))
    assert "API key needed" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model-1")).options) == 3)
    base = str(files["base"])
    Select(browser.find_element(By.ID, "model-0")).select_by_value(base)
    Select(browser.find_element(By.ID, "model-1")).select_by_value("alpha")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(NEW_TOKENS))

    histories = {base: [], "alpha": []}
    for turn, prompt in enumerate(["Tell me about the cat.", "And the dog?"], start=1):
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "send").click()
        wait.until(  # both streams ended: the page enables Send again
            lambda d: (
                d.find_element(By.ID, "send").is_enabled()
                and all(
                    d.find_element(By.ID, f"pane-{i}").get_attribute("data-state")
                    in ("done", "error")
                    for i in (0, 1)
                )
            )
        )
        shown = []
        for i, model in ((0, base), (1, "alpha")):
            pane = browser.find_element(By.ID, f"pane-{i}")
            assert pane.get_attribute("data-state") == "done", pane.text
            answers = pane.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            assert len(answers) == turn
            text = answers[-1].get_attribute("textContent")
            histories[model].append({"role": "user", "content": prompt})
            assert text == _api_answer(server, model, histories[model])  # same as the API
            histories[model].append({"role": "assistant", "content": text})
            assert "tokens/s" in pane.find_element(By.CSS_SELECTOR, ".stats").text
            shown.append(text)
        assert shown[0] and shown[1] and shown[0] != shown[1]  # two models, two answers
        browser.save_screenshot(str(_artifacts() / f"chat_page_turn{turn}.png"))
