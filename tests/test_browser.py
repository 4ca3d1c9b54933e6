"""The search page in a real headless Chromium (Selenium), against uvicorn on a free 127.0.0.1 port, over 3 images of
each of the demo model's 18 labels drawn by tools/shapes.py, searched with the demo model.

Set OPENCLIP_LITE_SCREENSHOT=docs/search-page.png to rewrite the README's screenshot from this run.
"""

import base64
import io
import os
import shutil
import tempfile

import pytest
from PIL import Image
from test_server import LABELS, ROOT, draw_images, running

import openclip_lite as clip

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from openclip_lite.search import Embeddings
from openclip_lite.server import create_app

DEMO = os.path.join(ROOT, "examples", "assets", "demo-model.safetensors")
QUERY = "a photo of a red circle"
WAIT = 60  # seconds; generous, for a loaded CI machine


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    return draw_images(tmp_path_factory.mktemp("photos"), LABELS, per_label=3, size=128, seed=7)


@pytest.fixture(scope="module")
def base_url(photos):
    model, preprocess = clip.load(DEMO, device="cpu")
    features = clip.encode_images(model, preprocess, photos, num_workers=0).features
    index = Embeddings(features.cpu(), photos, DEMO)
    with running(create_app(index, model, preprocess, model_name="demo-model")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,900",
    ):
        options.add_argument(argument)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    if os.path.exists("/usr/bin/chromium"):
        options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, base_url):
    """The page, freshly loaded, once it has shown the index's info."""
    browser.get(f"{base_url}/")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "info").text not in ("", "Loading…"))
    assert browser.find_element(By.ID, "info").text == "54 images, model demo-model"
    return browser


# ---------------------------------------------------------------------------------------------------- helpers


def answers(driver) -> int:
    """How many answers (results or errors) the page has shown since it loaded."""
    return int(driver.execute_script("return Number(document.body.dataset.answers || 0)"))


def after(driver, action) -> str:
    """Run `action`, wait for the page to show the answer to it; returns "done" or "error"."""
    before = answers(driver)
    action()
    WebDriverWait(driver, WAIT).until(lambda d: answers(d) > before)
    return driver.execute_script("return document.body.dataset.state")


def results(driver) -> list[dict]:
    return driver.execute_script(
        """return [...document.querySelectorAll('#results li')].map(li => ({
            rank: Number(li.querySelector('.rank').textContent.slice(1)),
            score: Number(li.querySelector('.score').textContent),
            name: li.querySelector('.name').textContent,
            alt: li.querySelector('img').alt}))"""
    )


def text_search(driver, text: str) -> str:
    box = driver.find_element(By.ID, "q")
    box.clear()
    return after(driver, lambda: box.send_keys(text, Keys.ENTER))


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def thumbnails_loaded(driver, count: int) -> bool:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results img')].slice(0, arguments[0]).every(i => i.complete && i.naturalWidth > 0)", count
    )


def send_file_event(driver, path: str, event: str) -> None:
    """Dispatch a synthetic drop (on the drop zone) or paste (on the page) carrying the file at `path`."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    driver.execute_script(
        """const [data, name, kind] = arguments;
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        const event = kind === 'drop'
            ? new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true})
            : new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true});
        (kind === 'drop' ? document.getElementById('drop') : document.body).dispatchEvent(event);""",
        data, os.path.basename(path), event,
    )


def assert_image_first(driver, path: str) -> None:
    shown = results(driver)
    name = os.path.basename(path)
    assert shown[0]["name"] == name and shown[0]["rank"] == 1, shown[:3]
    assert shown[0]["score"] == max(r["score"] for r in shown) and shown[0]["score"] >= 0.999, shown[:3]
    assert f"images like {name}" in driver.find_element(By.ID, "status").text
    assert visible(driver, "preview")


# ---------------------------------------------------------------------------------------------------- tests


def test_text_search_shows_red_circles_first(page):
    assert text_search(page, QUERY) == "done"
    shown = results(page)
    assert [r["name"].rsplit("_", 1)[0] for r in shown[:3]] == ["red_circle"] * 3, shown[:5]
    assert [r["rank"] for r in shown] == list(range(1, 21))
    assert [r["score"] for r in shown] == sorted((r["score"] for r in shown), reverse=True)
    assert all(r["alt"] == r["name"] for r in shown)
    assert page.find_element(By.ID, "status").text == f"50 results for “{QUERY}”, page 1 of 3"
    WebDriverWait(page, WAIT).until(lambda d: thumbnails_loaded(d, 3))
    assert not visible(page, "error")


def test_pagination_with_mouse_and_keyboard_then_reset(page):
    assert text_search(page, "a photo of a blue square") == "done"
    first = results(page)
    assert page.find_element(By.ID, "page-label").text == "Page 1 of 3"
    assert not page.find_element(By.ID, "prev").is_enabled() and page.find_element(By.ID, "next").is_enabled()

    assert after(page, page.find_element(By.ID, "next").click) == "done"
    second = results(page)
    assert [r["rank"] for r in second] == list(range(21, 41))
    assert not {r["name"] for r in second} & {r["name"] for r in first}

    next_button = page.find_element(By.ID, "next")
    assert after(page, lambda: next_button.send_keys(Keys.ENTER)) == "done"  # the keyboard works the pager too
    third = results(page)
    assert [r["rank"] for r in third] == list(range(41, 51))
    assert page.find_element(By.ID, "page-label").text == "Page 3 of 3"
    assert not page.find_element(By.ID, "next").is_enabled()
    assert page.switch_to.active_element.get_attribute("id") == "prev"  # focus stays on the pager

    assert after(page, page.find_element(By.ID, "prev").click) == "done"
    assert results(page) == second

    k = page.find_element(By.ID, "k")
    k.clear()
    assert after(page, lambda: k.send_keys("5", Keys.ENTER)) == "done"  # a new top K searches again
    assert [r["rank"] for r in results(page)] == [1, 2, 3, 4, 5] and not visible(page, "pager")
    assert page.find_element(By.ID, "status").text.startswith("5 results")

    page.find_element(By.ID, "reset").click()
    assert results(page) == []
    assert page.find_element(By.ID, "q").get_attribute("value") == ""
    assert page.find_element(By.ID, "k").get_attribute("value") == "50"
    assert page.find_element(By.ID, "status").text == ""
    assert not visible(page, "pager") and not visible(page, "error") and not visible(page, "preview")
    assert page.switch_to.active_element.get_attribute("id") == "q"


def test_paging_keeps_the_top_k_of_the_results_shown(page):
    """A K typed without Enter is for the next search: Previous and Next turn the pages of the results on screen."""
    assert text_search(page, QUERY) == "done"
    assert after(page, page.find_element(By.ID, "next").click) == "done"
    assert after(page, page.find_element(By.ID, "next").click) == "done"
    assert page.find_element(By.ID, "page-label").text == "Page 3 of 3"
    k = page.find_element(By.ID, "k")
    k.clear()
    k.send_keys("10")  # no Enter

    assert after(page, page.find_element(By.ID, "prev").click) == "done"
    assert [r["rank"] for r in results(page)] == list(range(21, 41))
    assert page.find_element(By.ID, "status").text == f"50 results for “{QUERY}”, page 2 of 3"
    assert not visible(page, "error")
    assert after(page, page.find_element(By.ID, "next").click) == "done"
    assert [r["rank"] for r in results(page)] == list(range(41, 51))

    assert after(page, lambda: k.send_keys(Keys.ENTER)) == "done"  # Enter: a new search with the new K, from page 1
    assert [r["rank"] for r in results(page)] == list(range(1, 11)) and not visible(page, "pager")
    assert page.find_element(By.ID, "status").text == f"10 results for “{QUERY}”, page 1 of 1"


def test_an_empty_top_k_is_the_default_in_text_and_image_search(page, photos):
    k = page.find_element(By.ID, "k")
    k.clear()
    assert text_search(page, QUERY) == "done"
    assert page.find_element(By.ID, "status").text == f"50 results for “{QUERY}”, page 1 of 3"
    assert k.get_attribute("value") == "50"  # the box shows the K the answer used
    k.clear()
    assert after(page, lambda: page.find_element(By.ID, "image").send_keys(photos[5])) == "done"
    assert page.find_element(By.ID, "status").text.startswith("50 results for images like")
    assert k.get_attribute("value") == "50"


def test_a_top_k_that_is_no_number_is_an_error_not_the_default(page):
    k = page.find_element(By.ID, "k")
    k.clear()
    k.send_keys("1e")  # a number box lets it be typed, and reads it as ""
    assert text_search(page, QUERY) == "error"
    assert "top K) is not a number" in page.find_element(By.ID, "error").text
    assert results(page) == []


def test_choosing_the_same_file_again_searches_again(page, photos):
    path = photos[10]
    picker = page.find_element(By.ID, "image")
    assert after(page, lambda: picker.send_keys(path)) == "done"
    assert_image_first(page, path)
    assert len(results(page)) == 20
    k = page.find_element(By.ID, "k")
    k.clear()
    k.send_keys("3")  # no Enter: the next search takes it
    assert after(page, lambda: picker.send_keys(path)) == "done"
    assert_image_first(page, path)
    assert [r["rank"] for r in results(page)] == [1, 2, 3]


def test_upload_shows_the_image_first(page, photos):
    path = photos[10]
    assert after(page, lambda: page.find_element(By.ID, "image").send_keys(path)) == "done"
    assert_image_first(page, path)


def test_drop_shows_the_image_first(page, photos):
    path = photos[31]
    assert after(page, lambda: send_file_event(page, path, "drop")) == "done"
    assert_image_first(page, path)


def test_paste_shows_the_image_first(page, photos):
    path = photos[47]
    assert after(page, lambda: send_file_event(page, path, "paste")) == "done"
    assert_image_first(page, path)


def test_empty_query_shows_the_api_error_then_a_search_clears_it(page):
    assert text_search(page, "   ") == "error"
    assert visible(page, "error")
    assert "The query is empty" in page.find_element(By.ID, "error").text
    assert results(page) == []
    assert text_search(page, QUERY) == "done"
    assert not visible(page, "error") and len(results(page)) == 20


def test_non_image_upload_shows_an_error(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a picture\n" * 20)
    assert after(page, lambda: page.find_element(By.ID, "image").send_keys(str(notes))) == "error"
    message = page.find_element(By.ID, "error").text
    assert visible(page, "error") and "notes.txt is not an image" in message, message
    assert results(page) == []


def test_bad_top_k_shows_the_api_error(page):
    k = page.find_element(By.ID, "k")
    k.clear()
    k.send_keys("0")
    assert text_search(page, QUERY) == "error"
    assert "k, the number of results, must be a whole number from 1 to 1000" in page.find_element(By.ID, "error").text


def test_every_control_is_labelled_and_reachable_by_keyboard(page):
    unlabelled = page.execute_script(
        """return [...document.querySelectorAll('input, button, [role=button]')]
            .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim()))
            .map(e => e.id)"""
    )
    assert unlabelled == []
    page.execute_script("document.activeElement.blur()")
    reached = []
    for _ in range(10):
        ActionChains(page).send_keys(Keys.TAB).perform()
        reached.append(page.switch_to.active_element.get_attribute("id"))
    assert {"q", "text-search", "image", "drop", "k", "reset"} <= set(reached), reached


def test_screenshot(browser, base_url, tmp_path):
    """The page with the results for QUERY, as a small PNG (< 200 KB): the README's screenshot."""
    browser.set_window_size(1000, 820)
    try:
        browser.get(f"{base_url}/")
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "info").text.endswith("demo-model"))
        assert text_search(browser, QUERY) == "done"
        browser.execute_script("document.activeElement.blur()")
        WebDriverWait(browser, WAIT).until(lambda d: thumbnails_loaded(d, 10))
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    finally:
        browser.set_window_size(1100, 900)
    out = io.BytesIO()
    shot.quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    assert shot.size[0] >= 900 and len(out.getvalue()) < 200_000, len(out.getvalue())
    (tmp_path / "search-page.png").write_bytes(out.getvalue())
    target = os.environ.get("OPENCLIP_LITE_SCREENSHOT")
    if target:
        with open(os.path.join(ROOT, target) if not os.path.isabs(target) else target, "wb") as f:
            f.write(out.getvalue())
