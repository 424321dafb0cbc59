"""The explore page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages,
driven by selenium; nothing downloads) loads the page, uploads images, switches layer and head, opens an atom,
intervenes, and reads back the rendered pictures and numbers. The screenshots are kept under the test's tmp dir
and, when ``CRATEVIT_ARTIFACTS`` names a folder (CI sets it), copied there."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit import create_model
from cratevit.explore import Explorer
from cratevit.explore.app import serve
from cratevit.explore.session import ImageItem, builtin_samples

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver  # the dev extra; like the browser, a missing piece fails the test, never skips it

    if not (CHROMIUM and DRIVER):  # CI installs them (.ci/run)
        pytest.fail("the browser test needs Chromium and its driver: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1300",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = create_model("crate_nano", num_classes=6)
    photos = builtin_samples()[:3]
    explorer = Explorer(model, "crate_nano (random)", (0.5,) * 3, (0.5,) * 3, photos, photos,
                        [f"shape {i}" for i in range(6)], "3 photos")  # fmt: skip
    srv = serve(explorer, port=0, background=True)
    yield srv
    srv.stop()


def _picture(driver, element_id: str) -> np.ndarray:
    src = driver.find_element("id", element_id).get_attribute("src")
    assert src.startswith("data:image/png;base64,"), f"{element_id} shows no picture"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _wait(driver, condition, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"timed out waiting for {what}")


def _renders(driver) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-renders") or 0)


def _numbers(driver) -> dict[str, str]:
    rows = driver.find_elements("css selector", "#numbers tr")
    return {r.find_elements("tag name", "td")[0].text: r.find_elements("tag name", "td")[1].text for r in rows}


def _keep(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, int(height) + 150))  # the whole page in one picture
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    if os.environ.get("CRATEVIT_ARTIFACTS"):
        out = Path(os.environ["CRATEVIT_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)
    return shot


def test_page_upload_switch_atoms_and_bad_upload(browser, server, tmp_path) -> None:
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    _wait(d, lambda d: _renders(d) >= 1, "the first picture")
    assert (
        "crate_nano" in d.find_element("id", "model").text and "6 layers, 3 heads" in d.find_element("id", "model").text
    )

    # upload a real photo (a file the browser sends, as a user would)
    photo = tmp_path / "cat photo.png"
    builtin_samples()[1].image.resize((240, 160)).save(photo)
    n = _renders(d)
    d.find_element("id", "file").send_keys(str(photo))
    _wait(d, lambda d: _renders(d) > n and "cat photo.png" in d.find_element("id", "cap-input").text, "the upload")
    assert "48x32" in d.find_element("id", "cap-input").text  # 240x160 -> short side 32, keep aspect
    first = {k: _picture(d, f"img-{k}") for k in ("input", "attention", "rollout", "mask", "pca")}
    for name, pic in first.items():
        assert pic.shape[1] == 256 and pic.std() > 1, f"{name} picture is blank"
    assert len(d.find_elements("css selector", "#heads img")) == 3

    # switch layer, then head: the attention picture and the numbers change
    numbers_last = _numbers(d)
    n = _renders(d)
    Select(d.find_element("id", "layer")).select_by_value("1")
    _wait(d, lambda d: _renders(d) > n, "the layer switch")
    assert "layer 1" in d.find_element("id", "cap-attention").text
    numbers_l1 = _numbers(d)
    assert numbers_l1["R^c layer 1"] and numbers_l1 != numbers_last
    att_mean = _picture(d, "img-attention")
    n = _renders(d)
    Select(d.find_element("id", "head")).select_by_value("2")
    _wait(d, lambda d: _renders(d) > n, "the head switch")
    assert "head 2" in d.find_element("id", "cap-attention").text
    assert not np.array_equal(_picture(d, "img-attention"), att_mean)
    assert d.find_element("css selector", "#heads img.chosen").get_attribute("data-head") == "2"
    entropy = float(_numbers(d)["attention entropy"])
    assert 0 < entropy <= np.log(12 * 8) + 1e-3  # a distribution over the 12x8 patches
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-index") == "done", "the image-set index")

    # the per-layer curves: this image (6 layers) beside the image set's band once it is indexed
    _wait(d, lambda d: d.find_elements("css selector", "#curves polyline.set"), "the image set's curves")
    for curve in ("rc", "sparsity"):
        points = d.find_element("css selector", f"#curves svg[data-curve={curve}] polyline.image").get_attribute(
            "points"
        )
        assert len(points.split()) == 6
    assert d.find_elements("css selector", "#curves svg[data-curve=rc] polygon.band")

    # an atom of layer 1, then the intervention clamping it to 0
    d.find_elements("css selector", "#atoms button")[0].click()
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-atom") is not None, "the atom view")
    assert len(d.find_elements("css selector", "#atom-patches img")) > 0
    assert "active on patches" in d.find_element("id", "atom-stats").text
    d.find_element("id", "btn-clamp").click()
    _wait(
        d, lambda d: d.find_element("tag name", "body").get_attribute("data-intervened") is not None, "the intervention"
    )
    assert len(d.find_elements("css selector", "#later figure")) == 4  # layers 2..5 recomputed
    assert 0 <= float(d.find_element("id", "prob-after").text) <= 1
    _keep(d, tmp_path, "explore-page.png")

    # a bad upload: a message in the page, and the page keeps working
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    d.find_element("id", "file").send_keys(str(bad))
    error = _wait(
        d, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"), "the error"
    )
    assert "notes.png is not an image file" in error.text
    _keep(d, tmp_path, "explore-bad-upload.png")
    n = _renders(d)
    Select(d.find_element("id", "layer")).select_by_value("0")
    _wait(d, lambda d: _renders(d) > n, "a view after the bad upload")
    assert not d.find_element("id", "error").is_displayed()


def test_page_for_a_timm_vit(browser, tmp_path) -> None:
    """A timm ViT: attention, masks and PCA; no atoms or curves panels."""
    import timm

    from cratevit.explore.app import serve as serve_page

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=3
    )
    photos = [ImageItem("checker", Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255))]
    srv = serve_page(Explorer(vit, "vit", (0.5,) * 3, (0.5,) * 3, photos, photos), port=0, background=True)
    try:
        browser.get(srv.url)
        _wait(browser, lambda d: _renders(d) >= 1, "the first picture")
        assert not browser.find_element("id", "atoms-box").is_displayed()
        assert _picture(browser, "img-attention").std() > 1
        assert [o.text for o in browser.find_elements("css selector", "#facet option")] == ["token", "key", "attn"]
    finally:
        srv.stop()
