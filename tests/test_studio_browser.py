"""cotune studio in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium) goes through every page of one ``cotune studio`` process.

Each page's screenshot is kept in the test's temporary folder; with ``COTUNE_STUDIO_SCREENSHOTS=DIR``
(``make studio-screenshots``: ``docs/studio``) they are copied there. Without Chromium the tests skip,
saying how to install it, unless ``COTUNE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cotune.data.cot import parse_stages
from cotune.serve.launch import free_port
from test_studio import write_studio_files

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 16
QUESTION = "What colour is the shape?"


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not (chromium and driver):
        why = "needs Chromium and Selenium: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("COTUNE_REQUIRE_BROWSER"):
            pytest.fail(f"COTUNE_REQUIRE_BROWSER is set but the browser test {why}")
        pytest.skip(why)
    return chromium, driver


@contextlib.contextmanager
def studio_process(args: list[str], timeout: float = 120.0):
    """``python -m cotune studio`` on a free port; stopped by its PID."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.Popen([sys.executable, "-m", "cotune", "studio", "--port", str(port), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"studio exited: {proc.stderr.read().decode()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("studio did not come up") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mllama, shapes):
    return write_studio_files(tmp_path_factory.mktemp("studio-browser"), tiny_mllama, shapes)


@pytest.fixture(scope="module")
def url(files):
    _browser_or_skip()
    args = ["--data", str(files["data"]), "--data", str(files["reasoned"]), "--run", str(files["run"]),
            "--run", str(files["other"]), "--max_new_tokens", str(MAX_NEW_TOKENS)]  # fmt: skip
    with studio_process(args) as url:
        yield url


@pytest.fixture(scope="module")
def browser(url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_or_skip()
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.binary_location = chromium
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio-screenshots")
    yield folder
    target = os.environ.get("COTUNE_STUDIO_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, Path(target) / png.name)


def _wait(browser, test, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: test(d))


def _open(browser, url, page):
    browser.get(f"{url}/#{page}")
    _wait(browser, lambda d: d.execute_script("return document.getElementById('page').dataset.ready") == page)
    browser.execute_script("document.getElementById('page').dataset.ready = ''")


DECODED = "return [...document.querySelectorAll(arguments[0])].map(i => i.complete && i.naturalWidth > 0)"


def test_data_page_shows_pictures_stages_problems_and_augmentations(browser, url, files, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, url, "data")
    cards = browser.find_elements(By.CSS_SELECTOR, ".record")
    assert len(cards) == len(files["records"]) + 2
    decoded = lambda d: d.execute_script(DECODED, ".record:not([data-id=broken-picture]) img.picture")  # noqa: E731
    _wait(browser, lambda d: all(decoded(d)) and len(decoded(d)) == len(files["records"]) + 1)
    first = files["records"][0]
    want = parse_stages(first["conversations"][1]["value"])
    stages = cards[0].find_elements(By.CSS_SELECTOR, ".stage")
    assert [s.get_attribute("data-stage") for s in stages] == list(want)
    assert [s.text.split("\n", 1)[1] for s in stages] == list(want.values())
    cards[0].find_element(By.CSS_SELECTOR, "button.augment").click()
    _wait(browser, lambda d: d.execute_script(DECODED, ".aug img") == [True] * 5)
    browser.save_screenshot(str(shots / "data.png"))
    Select(browser.find_element(By.ID, "filter-problem")).select_by_value("problems")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".record")) == 1)
    problem = browser.find_element(By.CSS_SELECTOR, ".record .problem").text
    assert "missing.png" in problem and "not found" in problem


def test_runs_page_overlays_curves_per_stage_and_task_metrics(browser, url, shots):
    from selenium.webdriver.common.by import By

    _open(browser, url, "runs")
    charts = {c.get_attribute("data-metric"): c for c in browser.find_elements(By.CSS_SELECTOR, ".chart")}
    assert {"loss", "eval_loss", "eval_loss_summary", "eval_loss_conclusion", "eval_accuracy"} <= set(charts)

    def lines(metric):
        return [
            p.get_attribute("data-run") for p in charts[metric].find_elements(By.CSS_SELECTOR, "polyline")
        ]

    assert lines("loss") == ["run", "other"] and lines("eval_accuracy") == ["run"]
    browser.find_element(By.CSS_SELECTOR, "details.config summary").click()
    assert "model_name:" in browser.find_element(By.CSS_SELECTOR, "details.config pre").text
    browser.save_screenshot(str(shots / "runs.png"))


def test_answers_page_side_by_side_with_filters(browser, url, files, shots):
    from selenium.webdriver.common.by import By

    _open(browser, url, "answers")
    n = len(files["records"])
    assert len(browser.find_elements(By.CSS_SELECTOR, ".answer")) == n
    first = browser.find_elements(By.CSS_SELECTOR, ".answer")[0]
    assert [m.get_attribute("data-model") for m in first.find_elements(By.CSS_SELECTOR, ".model")] == [
        "none",
        "run",
    ]
    assert [v.text for v in first.find_elements(By.CSS_SELECTOR, ".verdict")] == ["right", "right"]
    _wait(browser, lambda d: all(d.execute_script(DECODED, ".answer img.picture")))
    browser.save_screenshot(str(shots / "answers.png"))
    browser.find_element(By.CSS_SELECTOR, "details.eval-tables summary").click()
    _wait(browser, lambda d: d.execute_script(DECODED, "img.eval-picture") == [True])  # a confusion matrix
    table = browser.find_element(By.CSS_SELECTOR, "table.metrics").text
    assert "answer accuracy" in table and "25.0%" in table
    browser.find_element(By.ID, "filter-wrong").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == n - 1)
    browser.find_element(By.ID, "filter-wrong").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == n)
    browser.find_element(By.ID, "filter-unchanged").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == 1)


def test_review_keys_write_decisions_reviewed_file_and_pairs(browser, url, files, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, url, "review")
    Select(browser.find_element(By.CSS_SELECTOR, "main select")).select_by_index(1)
    shown = "const i = document.getElementById('review-item'); return i ? i.dataset.key : null"  # no stale element
    key_is = lambda k: lambda d: d.execute_script(shown) == k  # noqa: E731
    _wait(browser, key_is("r1#0"))
    ActionChains(browser).send_keys("a").perform()
    _wait(browser, key_is("r1#1"))
    ActionChains(browser).send_keys("r").perform()
    _wait(browser, key_is("r2#0"))
    browser.save_screenshot(str(shots / "review.png"))
    ActionChains(browser).send_keys("e").perform()
    box = _wait(browser, lambda d: d.find_element(By.ID, "edit-reply"))
    box.clear()
    box.send_keys("<CONCLUSION>4</CONCLUSION>")
    ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    counts = "const c = document.getElementById('review-counts'); return c ? c.textContent : ''"
    _wait(browser, lambda d: "3 of 3 decided" in d.execute_script(counts))
    folder = files["reasoned"].parent
    decisions = json.loads((folder / "reasoned.review.json").read_text())
    assert {k: v["decision"] for k, v in decisions.items()} == {
        "r1#0": "accept",
        "r1#1": "reject",
        "r2#0": "edit",
    }
    reviewed = [json.loads(line) for line in (folder / "reasoned.reviewed.jsonl").read_text().splitlines()]
    assert [r["conversations"][1]["value"] for r in reviewed][1] == "<CONCLUSION>4</CONCLUSION>"
    pairs = [json.loads(line) for line in (folder / "reasoned.pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["rejected"][-24:]) for p in pairs] == [
        ("r1", "<CONCLUSION>circle</CONCLUSION>"[-24:]), ("r2", "<CONCLUSION>3</CONCLUSION>"[-24:])
    ]  # fmt: skip


def _generate(tiny_mllama, adapters: list[str], image: str, search: str = "none") -> dict[str, str]:
    """``cotune generate``'s replies, one per adapter (the library call behind the command)."""
    from cotune.config import load_options
    from cotune.infer.commands import run_generate

    overrides = [("model_name", str(tiny_mllama)), ("image", image), ("max_new_tokens", MAX_NEW_TOKENS)]
    overrides.append(("search", search))
    overrides += [("adapter", a) for a in adapters]
    out = io.StringIO()
    run_generate(load_options("generate", overrides=overrides).options, QUESTION, out=out)
    parts = out.getvalue().split("--- ")[1:]
    return {p.split(" ---\n", 1)[0]: p.split(" ---\n", 1)[1].strip() for p in parts}


def test_chat_answers_side_by_side_as_cotune_generate_does(browser, url, files, tiny_mllama, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, url, "chat")
    thumb = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".thumbs img"))[0]
    image = files["data"].parent / files["records"][0]["image"]
    assert thumb.get_attribute("data-src").endswith(files["records"][0]["image"])
    thumb.click()
    browser.find_element(By.ID, "chat-question").send_keys(QUESTION)
    browser.find_element(By.ID, "chat-ask").click()
    done = "return [...document.querySelectorAll('.chat-col pre')].map(p => p.dataset.done || '')"
    _wait(browser, lambda d: d.execute_script(done) == ["true", "true"], timeout=240)
    texts = "return [...document.querySelectorAll('.chat-col')].map(c => [c.dataset.model, c.querySelector('pre').textContent])"
    got = dict(browser.execute_script(texts))
    browser.save_screenshot(str(shots / "chat.png"))
    want = _generate(tiny_mllama, ["none", f"run={files['run'] / 'adapter'}"], str(image))
    assert got == want and got["none"] != got["run"]
    browser.find_element(By.ID, "chat-file").send_keys(str(image))  # the same picture, uploaded
    _wait(browser, lambda d: "uploaded" in d.find_element(By.ID, "status").text)
    browser.find_element(By.CSS_SELECTOR, "input[type=checkbox][value=none]").click()
    browser.find_element(By.ID, "chat-ask").click()
    _wait(browser, lambda d: d.execute_script(done) == ["true"], timeout=240)
    assert dict(browser.execute_script(texts)) == {"run": want["run"]}
    for search in ("stage", "best-of-n"):  # the searches, seeded as `cotune generate --search ...` is
        Select(browser.find_element(By.ID, "chat-search")).select_by_value(search)
        browser.find_element(By.ID, "chat-ask").click()
        _wait(browser, lambda d: d.execute_script(done) == ["true"], timeout=240)
        searched = _generate(tiny_mllama, ["none", f"run={files['run'] / 'adapter'}"], str(image), search)
        assert dict(browser.execute_script(texts)) == {"run": searched["run"]} != {"run": want["run"]}, search
