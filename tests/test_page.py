"""The search page (`GET /`) in headless Chromium against a real `python -m engine.serve`.

Needs the Debian packages `chromium` and `chromium-driver` (.ci/run installs them) and selenium (the `test`
extra); skipped with the reason when any is missing. One server (with an API key, `--model tiny` on its random
weights) and one browser per module. Set CNCLIP_PAGE_SCREENSHOT=docs/page.png to save a screenshot of the page
with results.

Tests of features whose server side may not be there yet (filters, "without", evidence, regions, duplicates,
payload keys) probe the server once (`capabilities`) and skip naming the feature when it answers 422 or 404.
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

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install --no-build-isolation -e '.[test]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

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
# Images added through the API after start-up: (id, scene seed, payload). "雪山日出-副本" is a near-copy of the
# gallery's 雪山日出 (scene 3), so the duplicates view has a group; the odd id tests URL encoding end to end.
ODD_ID = "cats/001 猫%.."
EXTRA_IMAGES = [("唐-1", 20, {"dynasty": "唐", "year": 700}), ("唐-2", 21, {"dynasty": "唐", "year": 750}),
                ("宋-1", 22, {"dynasty": "宋", "year": 1000}), ("明-1", 23, {"dynasty": "明", "year": 1400}),
                ("iiif-1", 24, None), (ODD_ID, 25, {"dynasty": "元", "year": 1300}),
                ("雪山日出-副本", 3, {"source": "雪山日出-副本.png"}), ("无-1", 26, None)]
# Texts paired to images through their payload's image_ids (as cn_clip's datasets and --texts pair them).
PAIRED_TEXTS = [("cap-0", "一幅落日山峦的画", ["落日山峦"]), ("cap-1", "夕阳下的山峦与唐代的诗", ["落日山峦", "唐-1"])]
N_IMAGES = len(SCENES) + len(EXTRA_IMAGES)
N_TEXTS = len(TEXTS) + len(PAIRED_TEXTS)
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


def near_copy(image: Image.Image) -> Image.Image:
    """The same picture with every pixel one level brighter: a near-duplicate."""
    return Image.fromarray(np.minimum(np.asarray(image, dtype=np.int16) + 1, 255).astype(np.uint8), "RGB")


def iiif_payload(server_url: str) -> dict:
    """A IIIF hit's payload as engine.iiif writes it; the full image URL answers 404 (the page must fall back to
    the thumbnail), and a `javascript:` viewer must not become a link."""
    return {"dynasty": "清", "year": 1700, "iiif": {
        "image": f"{server_url}/iiif-test/full/max/0/default.jpg",
        "region": f"{server_url}/iiif-test/10,20,100,80/max/0/default.jpg",
        "canvas": "https://example.org/canvas/1#xywh=10,20,100,80", "manifest": "https://example.org/manifest/1",
        "viewer": "https://example.org/viewer?manifest=1"}}


def add_extra_data(client: httpx.Client, server_url: str) -> None:
    """The images and paired texts beyond the start-up gallery (see EXTRA_IMAGES, PAIRED_TEXTS)."""
    images, payloads = [], []
    for image_id, seed, payload in EXTRA_IMAGES:
        picture = near_copy(scene(seed)) if image_id == "雪山日出-副本" else scene(seed)
        images.append(base64.b64encode(image_bytes(picture, "PNG")).decode())
        payloads.append(iiif_payload(server_url) if image_id == "iiif-1" else payload)
    answer = client.post("/v1/index/images", json={"images": images, "ids": [i for i, _, _ in EXTRA_IMAGES],
                                                   "payloads": payloads})
    assert answer.status_code == 200, answer.text
    answer = client.post("/v1/index/texts", json={"texts": [t for _, t, _ in PAIRED_TEXTS],
                                                  "ids": [i for i, _, _ in PAIRED_TEXTS],
                                                  "payloads": [{"image_ids": ids} for _, _, ids in PAIRED_TEXTS]})
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def server(tmp_path_factory, gallery):
    work = tmp_path_factory.mktemp("page-serve")
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": f"t{i}", "text": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(TEXTS)), encoding="utf-8")
    srv = ServerProcess(["--model", "tiny", "--gallery", str(gallery), "--texts", str(texts),
                         "--index", str(work / "index"), "--api-key", API_KEY, "--max-delay-ms", "5"],
                        work / "server.log", env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=REPO)
    with srv.serving():
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as client:
            add_extra_data(client, srv.url)
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def capabilities(api) -> dict[str, bool]:
    """Which of the newer server features answer (a 422 for an unknown field, or a 404 route, means not yet)."""
    def works(response: httpx.Response) -> bool:
        return response.status_code == 200

    image = ("probe.png", image_bytes(scene(1), "PNG"), "image/png")
    explained = api.post("/v1/search/images", json={"query": "山", "k": 1, "explain": True})
    return {
        "filters": works(api.post("/v1/search/images", json={"query": "山", "k": 1, "where": {"dynasty": "唐"}})),
        "text filters": works(api.post("/v1/search/texts", files={"image": image},
                                       data={"k": "1", "where": json.dumps({"image_ids": {"$exists": True}})})),
        "negative": works(api.post("/v1/search/images", json={"query": "山", "k": 1, "negative": "雪"})),
        "explain": works(explained) and "evidence" in explained.json()["hits"][0],
        "collapse": works(api.post("/v1/search/images", json={"query": "山", "k": 1, "collapse": "duplicates"})),
        "box": works(api.post("/v1/search/similar", files={"image": image},
                              data={"k": "1", "box": "[0, 0, 100, 80]", "against": "crops"})),
        "duplicates": works(api.get("/v1/index/duplicates", params={"threshold": 0.95})),
        "payload keys": works(api.get("/v1/index/payload-keys", params={"kind": "images"})),
    }


def need(capabilities: dict[str, bool], *features: str) -> None:
    """Skip (naming the feature) when the server does not answer it yet."""
    for feature in features:
        if not capabilities[feature]:
            pytest.skip(f"server side of {feature} not landed yet")


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


def expected_caption(hit: dict, with_pairs: bool = True) -> str:
    """What a card should say: the first paired text (by text id; only when the server can list them), else the
    payload's text, caption or title, else its source, else the id."""
    paired = [text for _, text, ids in sorted(PAIRED_TEXTS) if with_pairs and str(hit["id"]) in ids]
    if paired:
        return paired[0]
    payload = hit.get("payload") or {}
    return next((payload[k] for k in ("text", "caption", "title", "source") if isinstance(payload.get(k), str)),
                str(hit["id"]))


def set_page_size(driver, size: int) -> None:
    if not driver.find_element(By.ID, "settings").get_property("open"):
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    Select(driver.find_element(By.ID, "page-size")).select_by_visible_text(str(size))


def card_button(driver, image_id: str, selector: str = "button.thumb"):
    """A control of the card showing `image_id` (ids can hold any character, so no CSS attribute selector)."""
    element = driver.execute_script(
        "const li = [...document.querySelectorAll('#results li.card')].find(li => li.dataset.id === arguments[0]);"
        " return li ? li.querySelector(arguments[1]) : null;", image_id, selector)
    assert element is not None, f"no card for {image_id!r}; page shows {page_state(driver)}"
    return element


def open_hit_view(driver, image_id: str) -> None:
    card_button(driver, image_id).click()
    wait(driver, lambda d: d.execute_script("return document.getElementById('hit-view').open"), "the hit view")
    wait(driver, lambda d: d.execute_script(
        "const img = document.getElementById('hit-image'); return img.complete && img.naturalWidth > 0"),
        "the hit view's picture to load")


def hit_view_texts(driver) -> list[dict]:
    wait(driver, lambda d: d.execute_script(
        "return document.querySelectorAll('#hit-texts li').length > 0"
        " || !document.getElementById('hit-texts-status').textContent.includes('Searching')"),
        "the hit view's best texts")
    return driver.execute_script("""
        return [...document.querySelectorAll('#hit-texts li')].map(li => (
          {id: li.dataset.id, score: Number(li.dataset.score), text: li.querySelector('.text').textContent}));""")


def fill_filter_row(driver, row: int, key: str, op: str, value: str) -> None:
    """Fill the filter's row `row` (0-based), adding rows as needed; `op` is the operator's option value."""
    while len(driver.find_elements(By.CSS_SELECTOR, "#filter-rows .filter-row")) <= row:
        driver.find_element(By.ID, "filter-add").click()
    line = driver.find_elements(By.CSS_SELECTOR, "#filter-rows .filter-row")[row]
    line.find_element(By.CSS_SELECTOR, ".filter-key").send_keys(key)
    Select(line.find_element(By.CSS_SELECTOR, ".filter-op")).select_by_value(op)
    if value:
        line.find_element(By.CSS_SELECTOR, ".filter-value").send_keys(value)


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


def test_text_search_shows_thumbnails_in_api_order(browser, server, api, capabilities):
    open_page(browser, server)
    query = "雪中的长城"
    search(browser, query)
    wait_search(browser)
    shown = wait_thumbnails(browser)
    want = api.post("/v1/search/images", json={"query": query, "k": PAGE_SIZE, "laclip": page_laclip(api)}).json()
    assert len(shown) == PAGE_SIZE
    assert_same(shown, want["hits"])
    for row, hit in zip(shown, want["hits"]):
        assert row["caption"] == expected_caption(hit, capabilities["text filters"])
        assert row["caption"] in row["alt"]
    screenshot_if_asked(browser)


def test_paging_asks_for_offset_plus_page_size(browser, server, api):
    open_page(browser, server)
    search(browser, "山水之间的古寺")
    wait_search(browser)
    browser.find_element(By.ID, "next-page").click()
    wait_search(browser)
    everything = api.post("/v1/search/images", json={"query": "山水之间的古寺", "k": N_IMAGES,
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
                    data={"k": str(N_TEXTS), "laclip": json.dumps(page_laclip(api))}).json()["hits"]
    assert len(shown) == N_TEXTS  # k was clamped to the number of indexed texts
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
                    data={"k": str(N_TEXTS), "laclip": json.dumps(page_laclip(api))}).json()["hits"]
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


def visible_controls(driver, scope: str = "document") -> list[dict]:
    """Every shown input, select and button under `scope` (a JS expression) with its tab index and label text."""
    return driver.execute_script(f"""
        return [...{scope}.querySelectorAll('input, select, button')].filter(e => e.offsetParent !== null)
          .map(e => ({{tag: e.tagName, id: e.id, type: e.type, tabindex: e.tabIndex,
                      label: e.labels && e.labels.length ? e.labels[0].textContent.trim() : e.textContent.trim()}}));""")


def assert_labelled(controls: list[dict]) -> None:
    assert controls and all(c["tabindex"] >= 0 for c in controls)
    assert all(c["label"] for c in controls), [c for c in controls if not c["label"]]


def test_keyboard_and_labels(browser, server):
    open_page(browser, server)
    assert_labelled(visible_controls(browser))
    assert not browser.find_elements(By.CSS_SELECTOR, "[onclick], div[role=button], a[href='#']")
    first = browser.find_element(By.ID, "query")
    first.click()
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "search-button"
    for region in ("status", "results", "error"):
        assert browser.find_element(By.ID, region).get_attribute("aria-live")


# ---- issue 29: random weights, captions, the hit view; issue 27: IIIF links; ids in URLs ----------------------------

def test_random_weights_are_said_and_shown(browser, server, api):
    assert api.get("/v1/info").json()["random_weights"] is True  # --model tiny without a checkpoint
    open_page(browser, server)
    banner = browser.find_element(By.ID, "weights-banner")
    assert banner.is_displayed()
    assert "随机权重 random weights: rankings mean nothing" in " ".join(banner.text.split())


def test_cards_show_paired_captions(browser, server, api, capabilities):
    need(capabilities, "text filters")
    open_page(browser, server)
    set_page_size(browser, 48)
    search(browser, "落日")
    wait_search(browser)
    shown = {r["id"]: r["caption"] for r in wait_thumbnails(browser)}
    assert len(shown) == N_IMAGES
    assert shown["落日山峦"] == "一幅落日山峦的画" and shown["唐-1"] == "夕阳下的山峦与唐代的诗"
    hits = api.post("/v1/search/images", json={"query": "落日", "k": N_IMAGES}).json()["hits"]
    assert shown == {str(h["id"]): expected_caption(h) for h in hits}


def test_hit_view_shows_picture_payload_captions_best_texts(browser, server, api, capabilities):
    need(capabilities, "text filters")
    open_page(browser, server)
    set_page_size(browser, 48)
    search(browser, "山峦")
    wait_search(browser)
    wait_thumbnails(browser)
    open_hit_view(browser, "落日山峦")
    view = browser.find_element(By.ID, "hit-view")
    assert browser.execute_script("return document.getElementById('hit-image').getBoundingClientRect().width") > 400
    assert [li.text for li in view.find_elements(By.CSS_SELECTOR, "#hit-captions li")] == [
        "一幅落日山峦的画", "夕阳下的山峦与唐代的诗"]
    payload = view.find_element(By.CSS_SELECTOR, "dl.payload").text
    assert "source" in payload and "落日山峦.png" in payload
    thumbnail = api.get("/v1/images/落日山峦/thumbnail").content
    want = api.post("/v1/search/texts", files={"image": ("thumbnail.jpg", thumbnail, "image/jpeg")},
                    data={"k": "5", "laclip": json.dumps(page_laclip(api))}).json()["hits"]
    assert_same(hit_view_texts(browser), want)
    assert_labelled(visible_controls(browser, "document.getElementById('hit-view')"))
    assert browser.switch_to.active_element.get_attribute("id") == "hit-close"
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)  # Escape closes it, focus goes back to the picture
    wait(browser, lambda d: not d.execute_script("return document.getElementById('hit-view').open"), "Escape")
    assert browser.switch_to.active_element == card_button(browser, "落日山峦")
    open_hit_view(browser, "落日山峦")
    browser.find_element(By.ID, "hit-more").click()  # "more like this" from the hit view
    wait_search(browser)
    assert not browser.find_element(By.ID, "hit-view").is_displayed()
    want = api.post("/v1/search/similar", json={"id": "落日山峦", "k": N_IMAGES - 1}).json()["hits"]
    assert_same(wait_thumbnails(browser), want)
    open_hit_view(browser, str(want[0]["id"]))
    browser.find_element(By.ID, "hit-close").click()
    assert not browser.find_element(By.ID, "hit-view").is_displayed()


def test_hit_view_iiif_links(browser, server, api):
    open_page(browser, server)
    set_page_size(browser, 48)
    search(browser, "古画")
    wait_search(browser)
    wait_thumbnails(browser)
    open_hit_view(browser, "iiif-1")
    iiif = iiif_payload(server.url)["iiif"]
    links = {a.get_attribute("data-kind"): (a.get_attribute("href"), " ".join(a.text.split()))
             for a in browser.find_elements(By.CSS_SELECTOR, "#hit-iiif a")}
    assert links == {"image": (iiif["image"], "IIIF 图像 image"), "region": (iiif["region"], "区域 region"),
                     "viewer": (iiif["viewer"], "在查看器中打开 open in viewer")}
    assert iiif["canvas"] in browser.find_element(By.ID, "hit-view").text
    # the IIIF full image answers 404 here: the picture stays the (loaded) thumbnail
    assert browser.execute_script("return document.getElementById('hit-image').dataset.source") == "thumbnail"
    browser.find_element(By.ID, "hit-close").click()
    # payload URLs become links only when they are http(s): never javascript: or data:
    allowed = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/static/dom.js').then(m => done(arguments[0].map(m.safeHttpUrl)));""",
        ["javascript:alert(1)", "data:text/html,x", " JavaScript:alert(1)", "/viewer?m=1", iiif["viewer"]])
    assert allowed == [None, None, None, f"{server.url}/viewer?m=1", iiif["viewer"]]


def test_odd_ids_are_encoded_in_every_url(browser, server, api):
    encoded = "cats%2F001%20%E7%8C%AB%25.."
    answer = httpx.get(f"{server.url}/v1/images/{encoded}/thumbnail", headers=AUTH)
    assert answer.status_code == 200, answer.text  # the server decodes %2F back to / and finds the id
    assert answer.content[:2] == b"\xff\xd8"  # a JPEG
    open_page(browser, server)
    set_page_size(browser, 48)
    search(browser, "猫")
    wait_search(browser)
    shown = {r["id"]: r for r in wait_thumbnails(browser)}
    assert shown[ODD_ID]["loaded"]
    requested = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/thumbnail'))")
    assert f"{server.url}/v1/images/{encoded}/thumbnail" in requested
    open_hit_view(browser, ODD_ID)
    assert hit_view_texts(browser)
    browser.find_element(By.ID, "hit-more").click()
    wait_search(browser)
    want = api.post("/v1/search/similar", json={"id": ODD_ID, "k": N_IMAGES - 1}).json()["hits"]
    assert_same(wait_thumbnails(browser), want)


# ---- issue 26: filters, "without", evidence, regions, duplicates ------------------------------------------------

def test_filter_field_sends_where(browser, server, api, capabilities):
    need(capabilities, "filters")
    open_page(browser, server)
    search(browser, "山")
    wait_search(browser)
    keys = browser.execute_script("return [...document.querySelectorAll('#payload-keys option')].map(o => o.value)")
    assert {"dynasty", "year"} <= set(keys)  # offered from the payloads seen
    fill_filter_row(browser, 0, "dynasty", "$eq", "唐")
    search(browser, "山")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "山", "k": PAGE_SIZE, "laclip": page_laclip(api),
                                               "where": {"dynasty": "唐"}}).json()["hits"]
    assert sorted(str(h["id"]) for h in want) == ["唐-1", "唐-2"]
    assert_same(wait_thumbnails(browser), want)
    assert "1–2 / 2" in browser.find_element(By.ID, "status").text  # fewer hits than asked: all there is
    assert browser.find_element(By.ID, "next-page").get_property("disabled")
    fill_filter_row(browser, 1, "year", "$gte", "720")  # 720 is read as a number
    search(browser, "山")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "山", "k": PAGE_SIZE, "laclip": page_laclip(api), "where": {
        "$and": [{"dynasty": "唐"}, {"year": {"$gte": 720}}]}}).json()["hits"]
    assert [str(h["id"]) for h in want] == ["唐-2"]
    assert_same(wait_thumbnails(browser), want)
    fill_filter_row(browser, 2, "$bad", "$eq", "1")  # the server's 422 for a bad filter is shown
    search(browser, "山")
    wait_search(browser, "error")
    assert browser.find_element(By.ID, "error").text.startswith("422: ")


def test_without_field_sends_negative(browser, server, api, capabilities):
    need(capabilities, "negative")
    open_page(browser, server)
    browser.find_element(By.ID, "negative").send_keys("雪山")
    weight = browser.find_element(By.ID, "negative-weight")
    weight.clear()
    weight.send_keys("0.8")
    search(browser, "日出")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "日出", "k": PAGE_SIZE, "laclip": page_laclip(api),
                                               "negative": "雪山", "negative_weight": 0.8}).json()["hits"]
    assert_same(wait_thumbnails(browser), want)


def test_evidence_overlay_draws_the_best_crop_and_all_on_hover(browser, server, api, capabilities):
    need(capabilities, "explain")
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    if not browser.find_element(By.ID, "explain").is_selected():
        browser.find_element(By.ID, "explain").click()
    search(browser, "江南水乡")
    wait_search(browser)
    wait_thumbnails(browser)
    want = api.post("/v1/search/images", json={"query": "江南水乡", "k": PAGE_SIZE, "laclip": page_laclip(api),
                                               "explain": True}).json()["hits"]
    drawn = browser.execute_script("""
        return [...document.querySelectorAll('#results li.card')].map(li => [...li.querySelectorAll('svg.evidence rect')]
          .map(r => ({index: Number(r.dataset.index), best: r.classList.contains('best'),
                      box: ['x', 'y', 'width', 'height'].map(a => Number(r.getAttribute(a))),
                      visible: getComputedStyle(r).visibility === 'visible'})));""")
    for rects, hit in zip(drawn, want):
        evidence = hit["evidence"]
        assert len(rects) == len(evidence["crops"])
        for rect in rects:
            x0, y0, x1, y1 = evidence["crops"][rect["index"]]["box"]
            np.testing.assert_allclose(rect["box"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
            assert rect["best"] == (rect["index"] == evidence["best"]) == rect["visible"]
    # the best box sits where its pixels fall on the shown thumbnail (boxes are in the original's pixels)
    w, h = want[0]["evidence"]["image_size"]
    x0, y0, x1, y1 = want[0]["evidence"]["crops"][want[0]["evidence"]["best"]]["box"]
    frame, box = browser.execute_script("""
        const li = document.querySelector('#results li.card');
        const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; };
        return [r(li.querySelector('img')), r(li.querySelector('rect.best'))];""")
    scale = min(frame[2] / w, frame[3] / h)
    left, top = frame[0] + (frame[2] - w * scale) / 2, frame[1] + (frame[3] - h * scale) / 2
    np.testing.assert_allclose(box, [left + x0 * scale, top + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale],
                               atol=3)
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, "#results li.card button.thumb")).perform()
    assert browser.execute_script("""return [...document.querySelectorAll('#results li.card')][0]
        .querySelectorAll('svg.evidence rect').length > 1 && [...[...document.querySelectorAll('#results li.card')][0]
        .querySelectorAll('svg.evidence rect')].every(r => getComputedStyle(r).visibility === 'visible')""")


def test_draw_a_box_for_region_search_and_contains_this_detail(browser, server, api, capabilities, tmp_path):
    need(capabilities, "box")
    path = tmp_path / "region.png"
    path.write_bytes(image_bytes(scene(7, 400, 300), "PNG"))
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "input[name=image-target][value=similar]").click()
    upload(browser, path)
    wait_search(browser)
    assert_labelled(visible_controls(browser, "document.getElementById('region-editor')"))
    overlay = browser.find_element(By.ID, "region-overlay")
    width = overlay.rect["width"]
    scale = 400 / width
    ActionChains(browser).move_to_element_with_offset(overlay, -width / 4, -overlay.rect["height"] / 4) \
        .click_and_hold().move_by_offset(width / 3, overlay.rect["height"] / 3).release().perform()
    wait_search(browser)
    box = [int(browser.find_element(By.ID, f"box-{c}").get_property("value")) for c in ("x0", "y0", "x1", "y1")]
    np.testing.assert_allclose(box, [100, 75, 100 + 400 / 3, 75 + 100], atol=2 * scale + 1)
    assert browser.find_element(By.ID, "region-rect").is_displayed()
    data = path.read_bytes()

    def similar(**fields):
        return api.post("/v1/search/similar", files={"image": (path.name, data, "image/png")},
                        data={"k": str(PAGE_SIZE), **fields}).json()["hits"]

    assert_same(wait_thumbnails(browser), similar(box=json.dumps(box), explain="true"))
    for field, value in zip(("x0", "y0", "x1", "y1"), (10, 20, 210, 220)):  # the keyboard way
        box_field = browser.find_element(By.ID, f"box-{field}")
        box_field.clear()
        box_field.send_keys(str(value))
    browser.find_element(By.ID, "against-crops").click()
    wait_search(browser)
    assert_same(wait_thumbnails(browser), similar(box="[10, 20, 210, 220]", against="crops", explain="true"))
    browser.find_element(By.CSS_SELECTOR, "input[name=image-target][value=texts]").click()  # the region, for texts
    wait_search(browser)
    assert not browser.find_element(By.ID, "against-crops").is_enabled()
    want = api.post("/v1/search/texts", files={"image": (path.name, data, "image/png")}, data={
        "k": str(N_TEXTS), "box": "[10, 20, 210, 220]", "laclip": json.dumps(page_laclip(api))}).json()["hits"]
    assert_same(text_results(browser), want)


def test_duplicate_groups(browser, server, api, capabilities):
    need(capabilities, "duplicates")
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#duplicates-panel summary").click()
    threshold = browser.find_element(By.ID, "dup-threshold")
    threshold.clear()
    threshold.send_keys("0.999", Keys.ENTER)
    wait_search(browser)
    want = api.get("/v1/index/duplicates", params={"threshold": 0.999, "limit": 100}).json()["groups"]
    assert any({"雪山日出", "雪山日出-副本"} <= {str(m) for m in g["members"]} for g in want)
    shown = browser.execute_script("""
        return [...document.querySelectorAll('#results .dup-group')].map(g => [...g.querySelectorAll('li.card')]
          .map(li => li.dataset.id));""")
    assert shown == [[str(m) for m in g["members"]] for g in want]
    wait_thumbnails(browser)
    assert browser.switch_to.active_element.get_attribute("id") == "status"


def test_collapse_duplicates_setting(browser, server, api, capabilities):
    need(capabilities, "collapse")
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "collapse").click()
    search(browser, "雪山日出")
    wait_search(browser)
    want = api.post("/v1/search/images", json={"query": "雪山日出", "k": PAGE_SIZE, "laclip": page_laclip(api),
                                               "collapse": "duplicates"}).json()["hits"]
    assert_same(wait_thumbnails(browser), want)
