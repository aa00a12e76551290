"""The search page (`GET /`) in headless Chromium against a real `python -m engine.serve`.

Needs the Debian packages `chromium` and `chromium-driver` (.ci/run installs them) and selenium (the `test`
extra); skipped with the reason when any is missing. One server (with an API key) and one browser per module.
Set CNCLIP_PAGE_SCREENSHOT=docs/page.png to save a screenshot of the page with results.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import SAMPLE_TEXTS, image_bytes
from engine.serve.launcher import ServerProcess

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless browser tests need chromium and chromedriver "
           "(Debian: apt-get install -y chromium chromium-driver; .ci/run does this)")

REPO = Path(__file__).resolve().parents[1]
API_KEY = "page-key-7"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PAGE_SIZE = 12  # the page's default "results per page"
WAIT_S = 60
SCENES = ["落日山峦", "青花纹样", "江南水乡", "雪山日出", "竹林小径", "沙漠驼队", "海上明月", "秋日枫林",
          "红墙金瓦", "荷塘月色", "草原骏马", "云海松涛", "渔舟唱晚", "梯田晨雾", "古城夜色", "樱花小巷"]
TEXTS = SAMPLE_TEXTS + ["西湖边的柳树", "黄山云海"]
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000", "--lang=zh-CN"]


def scene(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A small generated landscape (sky gradient, a sun, two mountain ridges) that reads well as a thumbnail."""
    rng = np.random.default_rng(seed)
    sky_top, sky_low = rng.integers(40, 256, 3), rng.integers(40, 256, 3)
    t = np.linspace(0, 1, height)[:, None, None]
    sky = (sky_top * (1 - t) + sky_low * t).repeat(width, 1).astype(np.uint8)
    image = Image.fromarray(sky, "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.integers(40, width - 40), rng.integers(30, height // 2), rng.integers(14, 40)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(200, 256, 3)))
    for layer, base in enumerate((0.55, 0.75)):
        xs = np.linspace(0, width, 9)
        ys = height * (base + rng.uniform(-0.18, 0.1, xs.size))
        shade = rng.integers(20, 140, 3) // (layer + 1)
        draw.polygon([(0, height), *zip(xs.tolist(), ys.tolist()), (width, height)],
                     fill=tuple(int(v) for v in shade))
    return image


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """16 generated scenes named in Chinese (ids are the file stems, so the thumbnail URLs need encoding)."""
    folder = tmp_path_factory.mktemp("page-gallery")
    for i, name in enumerate(SCENES):
        suffix, fmt = (".jpg", "JPEG") if i % 2 else (".png", "PNG")
        scene(i).save(folder / f"{name}{suffix}", format=fmt)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, gallery):
    work = tmp_path_factory.mktemp("page-serve")
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": f"t{i}", "text": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(TEXTS)), encoding="utf-8")
    srv = ServerProcess(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--gallery", str(gallery),
                         "--texts", str(texts), "--index", str(work / "index"), "--api-key", API_KEY,
                         "--max-delay-ms", "5"], work / "server.log",
                        env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=REPO)
    with srv.serving():
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# ---- helpers ------------------------------------------------------------------------------------------------------

def page_state(driver) -> dict:
    return driver.execute_script("return {status: document.getElementById('status').textContent,"
                                 " error: document.getElementById('error').textContent}")


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    """WebDriverWait with a failure message that says what did not happen and what the page shows."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page shows {page_state(driver)}") from None


def open_page(driver, server, key: str | None = API_KEY) -> None:
    """Load the page in a fresh tab state, wait until it has read /v1/info, and enter `key` if given."""
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), "the page to start")
    if key is not None:
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key)


def wait_search(driver, expect: str = "done") -> None:
    """Wait until the search just started has been answered, and check it ended `expect` ("done" or "error")."""
    state = wait(driver, lambda d: d.execute_script(
        "const s = document.getElementById('results').dataset.state; return s !== 'busy' && s"), "a search answer")
    assert state == expect, f"search ended {state!r}, expected {expect!r}; page shows {page_state(driver)}"


def image_results(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#results li.card')].map(li => {
          const img = li.querySelector('img');
          return {id: li.dataset.id, score: Number(li.dataset.score),
                  loaded: !!img && img.complete && img.naturalWidth > 0, alt: img ? img.alt : null,
                  caption: li.querySelector('.caption').textContent};
        });""")


def text_results(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#results li.text-hit')].map(li => (
          {id: li.dataset.id, score: Number(li.dataset.score), text: li.querySelector('.text').textContent}));""")


def wait_thumbnails(driver) -> list[dict]:
    wait(driver, lambda d: all(r["loaded"] for r in image_results(d)), "every thumbnail to load")
    return image_results(driver)


def assert_same(shown: list[dict], hits: list[dict]) -> None:
    """The page shows the API's hits: same ids in the same (score) order, same scores."""
    assert [r["id"] for r in shown] == [str(h["id"]) for h in hits]
    np.testing.assert_allclose([r["score"] for r in shown], [h["score"] for h in hits], rtol=0, atol=1e-6)
    assert all(a["score"] >= b["score"] for a, b in zip(shown, shown[1:]))


def page_laclip(api) -> dict:
    """The laclip settings the page sends by default: the server's own (from /v1/info)."""
    info = api.get("/v1/info").json()["laclip"]
    return {"tau": info["tau"], "alpha": info["alpha"], "weights": info["weights"]}


def search(driver, text: str) -> None:
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "image-file").send_keys(str(path))


def screenshot_if_asked(driver) -> None:
    """Save the whole page (no focus ring, top scrolled in) to $CNCLIP_PAGE_SCREENSHOT, if set."""
    target = os.environ.get("CNCLIP_PAGE_SCREENSHOT")
    if target:
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);"
                              " document.documentElement.style.overflow = 'hidden'")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        try:
            assert driver.get_screenshot_as_file(str(REPO / target))
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            driver.execute_script("document.documentElement.style.overflow = ''")


# ---- tests --------------------------------------------------------------------------------------------------------

def test_page_and_assets_are_served_offline(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "搜索" in page.text and "Search" in page.text
    for asset in ("app.js", "style.css"):
        assert f"/static/{asset}" in page.text
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_text_search_shows_thumbnails_in_api_order(browser, server, api):
    open_page(browser, server)
    query = "雪中的长城"
    search(browser, query)
    wait_search(browser)
    shown = wait_thumbnails(browser)
    want = api.post("/v1/search/images", json={"query": query, "k": PAGE_SIZE, "laclip": page_laclip(api)}).json()
    assert len(shown) == PAGE_SIZE
    assert_same(shown, want["hits"])
    for row, hit in zip(shown, want["hits"]):
        assert row["caption"] == hit["payload"]["source"]
        assert row["caption"] in row["alt"]
    screenshot_if_asked(browser)


def test_paging_asks_for_offset_plus_page_size(browser, server, api):
    open_page(browser, server)
    search(browser, "山水之间的古寺")
    wait_search(browser)
    browser.find_element(By.ID, "next-page").click()
    wait_search(browser)
    everything = api.post("/v1/search/images", json={"query": "山水之间的古寺", "k": len(SCENES),
                                                      "laclip": page_laclip(api)}).json()["hits"]
    assert_same(wait_thumbnails(browser), everything[PAGE_SIZE:])
    assert browser.find_element(By.ID, "next-page").get_property("disabled")
    browser.find_element(By.ID, "prev-page").click()
    wait_search(browser)
    assert_same(wait_thumbnails(browser), everything[:PAGE_SIZE])


def test_laclip_off_sends_alpha_one(browser, server, api):
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "laclip-on").click()
    search(browser, "敦煌壁画中的飞天")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "敦煌壁画中的飞天", "k": PAGE_SIZE,
                                               "laclip": {"alpha": 1}}).json()["hits"]
    assert_same(image_results(browser), want)


def test_laclip_settings_are_sent(browser, server, api):
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("laclip-tau", "0.05"), ("laclip-alpha", "0.2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#laclip-weights option[value=text]").click()
    search(browser, "蓝色丝绸上的牡丹花纹")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "蓝色丝绸上的牡丹花纹", "k": PAGE_SIZE, "laclip": {
        "tau": 0.05, "alpha": 0.2, "weights": "text"}}).json()["hits"]
    assert_same(image_results(browser), want)


def test_an_invalid_setting_is_named_not_sent(browser, server):
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    tau = browser.find_element(By.ID, "laclip-tau")
    tau.clear()
    tau.send_keys("0")
    search(browser, "雪中的长城")
    wait_search(browser, "error")
    assert browser.find_element(By.ID, "error").text.startswith("tau 无效 is invalid: \"0\"")
    assert browser.find_elements(By.CSS_SELECTOR, "#results li") == []


def test_more_like_this_uses_the_stored_vector(browser, server, api):
    open_page(browser, server)
    search(browser, "红色的灯笼挂在门口")
    wait_search(browser)
    first = wait_thumbnails(browser)[0]
    browser.find_element(By.CSS_SELECTOR, "#results li.card button.more").click()
    wait_search(browser)
    shown = wait_thumbnails(browser)
    query_id = next(h["id"] for h in api.post("/v1/search/images", json={
        "query": "红色的灯笼挂在门口", "k": 1, "laclip": page_laclip(api)}).json()["hits"])
    assert str(query_id) == first["id"]
    want = api.post("/v1/search/similar", json={"id": query_id, "k": PAGE_SIZE}).json()["hits"]
    assert_same(shown, want)
    assert first["id"] not in [r["id"] for r in shown]
    assert browser.switch_to.active_element.get_attribute("id") == "status"  # focus follows the new results


def test_image_upload_finds_texts_then_search_by_text(browser, server, api, gallery, tmp_path):
    path = tmp_path / "查询.png"
    path.write_bytes(image_bytes(scene(99), "PNG"))
    open_page(browser, server)
    upload(browser, path)
    wait_search(browser)
    shown = text_results(browser)
    want = api.post("/v1/search/texts", files={"image": (path.name, path.read_bytes(), "image/png")},
                    data={"k": str(len(TEXTS)), "laclip": json.dumps(page_laclip(api))}).json()["hits"]
    assert len(shown) == len(TEXTS)  # k was clamped to the number of indexed texts
    assert_same(shown, want)
    assert [r["text"] for r in shown] == [h["payload"]["text"] for h in want]
    browser.find_element(By.CSS_SELECTOR, "#results li.text-hit button").click()
    wait_search(browser)
    assert browser.find_element(By.ID, "query").get_property("value") == shown[0]["text"]
    assert len(wait_thumbnails(browser)) == PAGE_SIZE


def test_image_upload_finds_similar_images(browser, server, api, tmp_path):
    path = tmp_path / "similar.jpg"
    path.write_bytes(image_bytes(scene(5), "JPEG"))
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "input[name=image-target][value=similar]").click()
    upload(browser, path)
    wait_search(browser)
    want = api.post("/v1/search/similar", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                    data={"k": str(PAGE_SIZE)}).json()["hits"]
    assert_same(wait_thumbnails(browser), want)


@pytest.mark.parametrize("event", ["drop", "paste"])
def test_dropped_or_pasted_image_is_searched(browser, server, api, event):
    data = image_bytes(scene(42), "PNG")
    open_page(browser, server)
    browser.execute_script("""
        const [event, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const init = {bubbles: true, cancelable: true};
        document.getElementById(event === "drop" ? "drop-zone" : "query").dispatchEvent(event === "drop"
          ? new DragEvent("drop", {...init, dataTransfer: transfer})
          : new ClipboardEvent("paste", {...init, clipboardData: transfer}));""",
        event, base64.b64encode(data).decode())
    wait_search(browser)
    want = api.post("/v1/search/texts", files={"image": ("dropped.png", data, "image/png")},
                    data={"k": str(len(TEXTS)), "laclip": json.dumps(page_laclip(api))}).json()["hits"]
    assert_same(text_results(browser), want)
    assert browser.find_element(By.ID, "image-preview").is_displayed()


def test_corrupt_upload_shows_the_error(browser, server, api, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    open_page(browser, server)
    upload(browser, path)
    wait_search(browser, "error")
    answer = api.post("/v1/search/texts", files={"image": (path.name, path.read_bytes(), "image/png")},
                      data={"k": "3"})
    assert answer.status_code == 400
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "broken.png" in error.text and "object at 0x" not in error.text  # names the upload, no Python repr
    assert error.text == f"400: {answer.json()['detail']}"
    assert browser.find_elements(By.CSS_SELECTOR, "#results li") == []
    assert "Search failed" in browser.find_element(By.ID, "status").text


def test_api_key_field(browser, server):
    open_page(browser, server, key=None)
    field = browser.find_element(By.ID, "api-key")
    assert field.is_displayed() and field.get_attribute("type") == "password"
    search(browser, "青花瓷盘上的鱼")
    wait_search(browser, "error")
    assert browser.find_element(By.ID, "error").text.startswith("401: ")
    field.send_keys(API_KEY, Keys.ENTER)  # Enter in the key field repeats the search with the key
    wait_search(browser)
    assert len(wait_thumbnails(browser)) == PAGE_SIZE
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('cnclip-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0  # kept for the tab only


def test_keyboard_and_labels(browser, server):
    open_page(browser, server)
    controls = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button')].filter(e => e.offsetParent !== null)
          .map(e => ({tag: e.tagName, id: e.id, type: e.type, tabindex: e.tabIndex,
                      label: e.labels && e.labels.length ? e.labels[0].textContent.trim() : e.textContent.trim()}));""")
    assert controls and all(c["tabindex"] >= 0 for c in controls)
    assert all(c["label"] for c in controls), [c for c in controls if not c["label"]]
    assert not browser.find_elements(By.CSS_SELECTOR, "[onclick], div[role=button], a[href='#']")
    first = browser.find_element(By.ID, "query")
    first.click()
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "search-button"
    for region in ("status", "results", "error"):
        assert browser.find_element(By.ID, region).get_attribute("aria-live")
