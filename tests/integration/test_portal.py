"""`veil portal` in front of a real `veil serve`, driven by a real browser (Debian's chromium
through chromium-driver and Selenium): sign up, log in, create a key, use it from the Python
client the way the seed's tutorial does, revoke it, and the client is refused.

Screenshots of each page are written to the test's directory; with VEIL_UPDATE_SCREENSHOTS=1 they
are copied to docs/img/ (shown in docs/service.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import STOP_TIMEOUT_S, VeilServer, create_key, start_server

import veil

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or shutil.which("chromium") is None,
    reason="chromium and chromium-driver are installed by scripts/test (as root)",
)
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
PASSWORD = "a long enough password"
X = np.arange(6, dtype=np.float32).reshape(2, 3)
_SERVING = re.compile(r"veil portal: serving on http://127\.0\.0\.1:(\d+)\n")


@dataclass
class Running:
    server: VeilServer
    url: str
    shots: Path

    @property
    def address(self) -> str:
        s = self.server
        return f"127.0.0.1:{s.unattested_port}:{s.attested_port}:{s.management_port}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("veil-portal")
    _, admin_key = create_key(root / "data", "admin", "portal")
    server = start_server(root / "data", root / "log")
    address = f"127.0.0.1:{server.unattested_port}:{server.attested_port}:{server.management_port}"
    log = (root / "portal.log").open("wb")
    portal = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "portal",
            "--server",
            address,
            "--simulation",
            "--db",
            str(root / "portal.sqlite3"),
            "--port",
            "0",  # it binds a free port and prints it
            "--name",
            "veil demo service",
        ],
        env={**os.environ, "VEIL_ADMIN_KEY": admin_key},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    url = ""
    while True:
        if not url and (found := _SERVING.search((root / "portal.log").read_text())):
            url = f"http://localhost:{found[1]}"
        try:
            if url and httpx.get(f"{url}/login", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if portal.poll() is not None or time.monotonic() > deadline:
            portal.kill()
            portal.wait()
            server.stop()
            pytest.fail(f"veil portal did not start:\n{(root / 'portal.log').read_text()}")
        time.sleep(0.2)
    shots = root / "shots"
    shots.mkdir()
    yield Running(server, url, shots)
    portal.terminate()
    portal.wait(timeout=STOP_TIMEOUT_S)
    log.close()
    assert server.stop() == 0, server.stderr()[-3000:]
    if os.environ.get("VEIL_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, DOCS_IMG / shot.name)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,800",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shot(service: Running, driver: webdriver.Chrome, name: str) -> None:
    driver.save_screenshot(str(service.shots / f"portal-{name}.png"))


def staleness_of(element: WebElement) -> Callable[[Any], bool]:
    """Selenium's condition of that name, plus the answer Chrome gives when the old page is
    being replaced as it is asked (an "unknown error" in place of "stale element")."""

    def gone(_: Any) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in (exc.msg or ""):
                return True
            raise
        return False

    return gone


def click(driver: webdriver.Chrome, element_id: str) -> None:
    """Click a button that loads a page, and wait until the old page is gone."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, 30).until(staleness_of(page))


def fill(driver: webdriver.Chrome, *, submit: bool = True, **fields: str) -> None:
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)
    if submit:
        click(driver, "send")


SEED_SCRIPT = textwrap.dedent(
    """
    import os, numpy as np, veil
    from onnx_models import identity_model

    # As in the seed's tutorial: an API key, no address (VEIL_SERVER names the server).
    client = veil.Connection(api_key=os.environ["KEY"])
    client.upload_model(identity_model("float32"), model_id="seed-model", visibility="public")
    client.close()

    # Querying needs no account: an anonymous connection runs the public model.
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with veil.connect() as anonymous:
        out = anonymous.predict("seed-model", x).output[0].as_numpy()
    assert np.array_equal(out, x), out
    print("seed script: ok")
    """
)


def run_seed_script(service: Running, key: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "seed.py"
    script.write_text(SEED_SCRIPT)
    env = {
        **os.environ,
        "KEY": key,
        "VEIL_SERVER": service.address,
        "VEIL_SIMULATION": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.run(
        [sys.executable, "-W", "ignore", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sign_up_create_key_use_it_revoke_it(
    service: Running, browser: webdriver.Chrome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. The public catalogue and sign-up, without an account.
    browser.get(f"{service.url}/")
    assert "Public models" in browser.title
    browser.get(f"{service.url}/signup")
    browser.find_element(By.ID, "email").send_keys("alice@example.com")
    shot(service, browser, "signup")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    click(browser, "send")
    assert browser.current_url.endswith("/settings"), browser.page_source[:2000]
    # 2. Log out and in again.
    click(browser, "logout")
    browser.get(f"{service.url}/login")
    fill(browser, email="alice@example.com", password="not the password")
    assert "Wrong e-mail or password." in browser.page_source
    fill(browser, email="alice@example.com", password=PASSWORD)
    assert browser.current_url.endswith("/settings")
    # 3. Create a key: shown once.
    click(browser, "create-key")
    key = browser.find_element(By.ID, "secret").text
    assert key.startswith("veil_")
    shot(service, browser, "settings-new-key")
    key_id = key.split("_")[1]
    # 4. The seed's script, with that key: upload a public model; run it anonymously.
    done = run_seed_script(service, key, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed script: ok" in done.stdout
    # 5. The portal shows the model, the key's last use, and the public catalogue.
    browser.get(f"{service.url}/models")
    assert "seed-model" in browser.find_element(By.ID, "models").text
    shot(service, browser, "models")
    browser.get(f"{service.url}/settings")
    row = browser.find_element(By.ID, f"key-{key_id}").text
    assert "active" in row
    assert key not in browser.page_source  # never shown again
    shot(service, browser, "settings")
    browser.get(f"{service.url}/")
    assert "seed-model" in browser.find_element(By.ID, "catalogue").text
    shot(service, browser, "catalogue")
    # 6. Revoke it: the client is refused.
    browser.get(f"{service.url}/settings")
    click(browser, f"revoke-{key_id}")
    assert "revoked" in browser.find_element(By.ID, f"key-{key_id}").text
    monkeypatch.setenv("VEIL_SERVER", service.address)
    monkeypatch.setenv("VEIL_SIMULATION", "1")
    with veil.Connection(api_key=key) as client, pytest.raises(veil.AuthenticationError):
        client.upload_model(identity_model("float32"), model_id="after-revoke")
    with veil.Connection(api_key=key) as client, pytest.raises(veil.AuthenticationError):
        client.predict("seed-model", X)
    # Anonymous querying of the public model still works.
    with veil.connect() as anonymous:
        assert np.array_equal(anonymous.predict("seed-model", X).output[0].as_numpy(), X)


def test_login_page_and_escaping_in_the_browser(
    service: Running, browser: webdriver.Chrome
) -> None:
    browser.get(f"{service.url}/login")
    shot(service, browser, "login")
    evil = "<img src=x onerror=alert(1)>@example.com"
    browser.get(f"{service.url}/signup")
    fill(browser, submit=False, email=evil, password="short")
    # The browser would refuse the form itself (type=email, minlength); submit it through the
    # DOM to reach the server's own checks.
    page = browser.find_element(By.TAG_NAME, "html")
    browser.execute_script(
        "document.getElementById('email').type='text';"
        "document.getElementById('password').removeAttribute('minlength');"
        "document.querySelector('form.card').submit();"
    )
    WebDriverWait(browser, 30).until(staleness_of(page))
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert (
        "The password needs 12" in browser.page_source or "Enter an e-mail" in browser.page_source
    )


def test_cross_site_form_is_refused(service: Running, browser: webdriver.Chrome) -> None:
    """A form posted without the session's token (what another site can do) changes nothing."""
    browser.get(f"{service.url}/signup")
    page = browser.find_element(By.TAG_NAME, "html")
    browser.execute_script(
        "const f = document.querySelector('form.card');"
        "f.querySelector('[name=csrf]').value = 'forged';"
        "document.getElementById('email').value = 'mallory@example.com';"
        "document.getElementById('password').value = 'a long enough password';"
        "f.submit();"
    )
    WebDriverWait(browser, 30).until(staleness_of(page))
    assert "form expired or came from another site" in browser.page_source
    browser.get(f"{service.url}/login")
    fill(browser, email="mallory@example.com", password="a long enough password")
    assert "Wrong e-mail or password." in browser.page_source


def test_session_cookie_is_replaced_at_login(service: Running, browser: webdriver.Chrome) -> None:
    browser.get(f"{service.url}/signup")
    before = browser.get_cookie("__Host-veil-session")
    assert before is not None
    assert before["httpOnly"]
    assert before["secure"]
    assert before["sameSite"] == "Strict"
    fill(browser, email="dave@example.com", password=PASSWORD)
    after = browser.get_cookie("__Host-veil-session")
    assert after is not None
    assert after["value"] != before["value"]


def test_a_port_in_use_is_one_line_and_exit_2(service: Running, tmp_path: Path) -> None:
    _, admin_key = create_key(service.server.data_dir, "admin", "second portal")
    port = service.url.rsplit(":", 1)[1]  # the running portal's
    done = subprocess.run(
        [sys.executable, "-m", "veil.cli", "portal", "--server", service.address, "--simulation",
         "--db", str(tmp_path / "portal.sqlite3"), "--port", port],
        env={**os.environ, "VEIL_ADMIN_KEY": admin_key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    # (after the simulation-mode warning the --simulation connection gives)
    assert done.stderr.splitlines()[-1] == (
        f"veil portal: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use"
    )
    assert "Traceback" not in done.stderr
