"""The web console in a real browser: headless Chromium (Debian's chromium and chromedriver,
driven by Selenium) against a real `replicore serve` over its TLS port.

One operator's session from login to logout: a confirmed pairing request is approved into a
new repository, the source's replication job and push show up on the jobs page and its
recovery point on the agent's page, another request is denied, an agent the source deletes is
restored from the recycle bin. Pages are checked as the browser renders them.

With REPLICORE_SCREENSHOTS=DIR (e.g. docs/console) each page is saved as DIR/NN-page.png at
1366x768, after a made-up usage history is added for the billing chart (see
docs/console/README.md). Skipped when chromium, chromium-driver or selenium is missing.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from console_helpers import (
    BLOCK,
    CONSOLE_PATH,
    chromium,
    chromium_missing,
    iso_ago,
    module_server,
    named_source,
    pair_customer,
    push_image,
    screenshot_dir,
    seed_usage_history,
    start_job,
    sync_job,
)
from datapath_helpers import make_image
from faults_helpers import query
from pairing_helpers import pairing_body
from replicore.source import identity

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))

ADMIN = ("operator", "a long console password")
WAIT = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("console-browser")
    extra = "[console]\nusage_sample_interval = 1\nsilent_source_days = 2\n"
    with module_server(root, ADMIN, extra) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Any:
    with chromium() as driver:
        yield driver


class Operator:
    """What an operator does in the browser, with waits for the page each step loads."""

    def __init__(self, driver: Any, server: Any) -> None:
        self.driver, self.server = driver, server
        self.base = server.url.rstrip("/") + CONSOLE_PATH
        self.shots = screenshot_dir()
        self.shot_count = 0

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def wait_for(self, text: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(
            self.driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda _: text in self.text(), f"page never showed {text!r}")

    def find(self, css: str, within: Any = None) -> Any:
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_element(By.CSS_SELECTOR, css)

    def submit(self, css: str, within: Any = None) -> None:
        """Click a submit button; wait until the browser has left the page."""
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.find("html")
        self.find(css, within).click()
        WebDriverWait(self.driver, WAIT).until(lambda _: _stale(old), "the form was not sent")

    def screenshot(self, name: str) -> None:
        if self.shots is None:
            return
        self.shot_count += 1
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.driver.save_screenshot(str(self.shots / f"{self.shot_count:02d}-{name}.png"))


def _stale(element: Any) -> bool:
    """True once the element's page is gone. While a navigation is under way ChromeDriver
    may answer with a generic "does not belong to the document" error instead of a stale
    element reference: that means the same."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as error:
        if "does not belong to the document" in str(error):
            return True
        raise
    return False


def request_pairing(server: Any, source: identity.Identity, agents: list[str], **info: str) -> int:
    with server.client() as client:
        asked = client.post("slave/pairing/request", json=pairing_body(source, agents, **info))
    assert asked.status_code == 202, asked.text
    with server.client(source) as client:
        synced = client.post("slave/pairing/sync").json()
    assert synced["pairingState"] == "pending", synced
    return int(synced["requestId"])


def report_usage(server: Any, source: identity.Identity, protected: dict[str, int]) -> None:
    """The source's storage usage report (`PUT slave/storage`), as it sends one for billing."""
    body = {
        "agents": [
            {"id": agent, "totalBytesProtected": size, "recoveryPointCount": 1}
            for agent, size in protected.items()
        ]
    }
    with server.client(source) as client:
        answer = client.put("slave/storage", json=body)
    assert answer.status_code in (200, 204), answer.text


def populate(server: Any, make_source: Any) -> dict[str, Any]:
    """Two paired customers with recovery points, a running job, a repository near its
    quota: what an operator's core looks like, before the test's own steps."""
    hq = named_source(make_source, "hq", "hq-backup.acme.local")
    pair_customer(server, hq, ["fileserver", "sql01"], ADMIN, "ACME-001", "it@acme.example")
    disk = make_image(1, 24 * BLOCK, BLOCK)
    push_image(server, hq, "fileserver", "c-drive", 1, disk, timestamp=iso_ago(30 * 3600))
    changed = disk[: 4 * BLOCK] + make_image(2, 4 * BLOCK, BLOCK) + disk[8 * BLOCK :]
    push_image(
        server, hq, "fileserver", "c-drive", 2, changed, previous=1, timestamp=iso_ago(6 * 3600)
    )
    sql = make_image(3, 16 * BLOCK, BLOCK)
    push_image(server, hq, "sql01", "data", 1, sql, timestamp=iso_ago(5 * 3600))
    branch = named_source(make_source, "branch", "branch01.globex.local")
    pair_customer(server, branch, ["web01"], ADMIN, "GLOBEX-17", "backup@globex.example")
    web = make_image(4, 12 * BLOCK, BLOCK)
    push_image(server, branch, "web01", "root", 1, web, timestamp=iso_ago(50 * 3600))
    push_image(server, branch, "web01", "root", 9, web, previous=8, timestamp=iso_ago(2 * 3600))
    report_usage(server, hq, {"fileserver": len(disk), "sql01": len(sql)})
    report_usage(server, branch, {"web01": len(web)})
    (name, used) = query(
        server,
        "SELECT r.name, u.stored_bytes FROM repositories r JOIN record_usage u"
        " ON u.repository_id = r.id JOIN master_cores c ON c.repository_id = r.id"
        " WHERE c.core_id = ?",
        (hq.core_id,),
    )[0]
    assert server.cli("repository", "quota", name, str(int(used / 0.93))).status == 0
    with server.client(hq) as client:
        start_job(client, "hq-nightly-0412", "fileserver", ["c-drive:3"])
        sync_job(client, "hq-nightly-0412", phase="transferring", progress=62.0,
                 bytesTransferred=41 * 1024**2, bytesTotal=66 * 1024**2)  # fmt: skip
    return {"hq": hq, "branch": branch}


def test_an_operator_pairs_watches_replication_denies_restores_and_logs_out(
    server, browser, make_source
):
    fleet = populate(server, make_source)
    me = Operator(browser, server)

    # Every page but the login page sends a browser without a session to the login page.
    me.open("/jobs")
    me.wait_for("Use an administrator account")
    me.screenshot("login")
    me.find("input[name=user]").send_keys(ADMIN[0])
    me.find("input[name=password]").send_keys("not the password")
    me.submit("button[type=submit]")
    me.wait_for("Wrong administrator name or password")
    me.find("input[name=password]").send_keys(ADMIN[1])
    me.submit("button[type=submit]")
    me.wait_for("Running")  # back where it was going: the jobs page
    assert browser.current_url.endswith(f"{CONSOLE_PATH}/jobs")

    # A new source asks to pair; another one nobody knows asks too.
    newsite = named_source(make_source, "newsite", "newsite.initech.local")
    new_id = request_pairing(
        server, newsite, ["nas01", "vm-host"], customer_id="INITECH-5", email="ops@initech.example"
    )
    stranger = named_source(make_source, "stranger", "laptop-7.unknown.example")
    stranger_id = request_pairing(server, stranger, ["laptop-7"])

    me.open("/")
    me.wait_for("Warnings")
    dashboard = me.text()
    assert "2 pairing request(s) wait for a decision" in dashboard
    assert "hq-nightly-0412" in dashboard and "is 93% full" in dashboard
    assert "orphaned" in dashboard
    me.screenshot("dashboard")

    me.open("/pairing")
    me.wait_for(f"Request {new_id}")
    page = me.text()
    assert newsite.core_id in page and "INITECH-5" in page and "ops@initech.example" in page
    assert "nas01" in page and "vm-host" in page
    assert newsite.fingerprint.lower() in page.lower()
    me.screenshot("pairing-requests")

    # Approve it into a new repository of its own name.
    card = me.find(f"#request-{new_id}")
    me.find("input[name=new_repository]", card).send_keys("initech")
    me.submit(".approve-form button[type=submit]", card)
    me.wait_for(f"Approved request {new_id}")
    assert "nas01 into initech" in me.text()
    with server.client(newsite) as client:
        synced = client.post("slave/pairing/sync").json()
    assert synced["state"] == "Established"

    # Its replication job starts, pushes a recovery point of nas01, and finishes.
    image = make_image(5, 20 * BLOCK, BLOCK)
    with server.client(newsite) as client:
        start_job(client, "initech-first", "nas01", ["share:1"])
        sync_job(client, "initech-first", phase="transferring", progress=35.0,
                 bytesTransferred=7 * BLOCK, bytesTotal=20 * BLOCK)  # fmt: skip
    me.open("/jobs")
    me.wait_for("initech-first")
    assert "35%" in me.text() and "newsite.initech.local" in me.text()
    assert browser.find_elements("css selector", "meta[http-equiv=refresh]")
    me.screenshot("jobs")
    push_image(server, newsite, "nas01", "share", 1, image, timestamp=iso_ago(600))
    with server.client(newsite) as client:
        sync_job(client, "initech-first", state="succeeded", progress=100.0,
                 bytesTransferred=20 * BLOCK)  # fmt: skip
    me.open("/jobs")
    me.wait_for("Finished in the last 24 hours")
    finished = me.find("table.jobs", me.find("section.card:nth-of-type(2)"))
    assert "initech-first" in finished.text and "succeeded" in finished.text

    me.open("/agents")
    me.wait_for("nas01")
    me.screenshot("agents")
    me.find(f"a[href$='/agents/{_agent_pk(server, newsite, 'nas01')}']").click()
    me.wait_for("rp-nas01-share-1")
    page = me.text()
    assert "replicore export --agent nas01" in page and "share:1" in page
    assert "initech" in page

    # The other request is denied, with a reason its source is told.
    me.open("/pairing")
    me.wait_for(f"Request {stranger_id}")
    card = me.find(f"#request-{stranger_id}")
    me.find("form[action$='/deny'] input[name=reason]", card).send_keys("not a customer of ours")
    me.submit("form[action$='/deny'] button[type=submit]", card)
    me.wait_for(f"Denied request {stranger_id}")
    with server.client(stranger) as client:
        told = client.post("slave/pairing/sync").json()
    assert told["state"] == "Denied" and told["errorDetails"] == "not a customer of ours"

    # The source deletes nas01; the operator finds it in the bin and restores it.
    with server.client(newsite) as client:
        assert client.delete("slave/agents/nas01").status_code == 200
        assert client.get("slave/agents/nas01").status_code == 404
    me.open("/bin")
    me.wait_for("nas01")
    entry = query(server, "SELECT id FROM bin_entries WHERE agent_id = 'nas01'")[0][0]
    me.screenshot("recycle-bin")
    me.submit(f"#entry-{entry} form[action$='/restore'] button")
    me.wait_for("Restored agent nas01")
    restored_at = time.time()
    with server.client(newsite) as client:
        assert client.get("slave/agents/nas01/rpsCount").json()["count"] == 1
    me.open(f"/agents/{_agent_pk(server, newsite, 'nas01')}")
    me.wait_for("rp-nas01-share-1")
    me.open(f"/agents/{_agent_pk(server, fleet['hq'], 'fileserver')}")
    me.wait_for("rp-fileserver-c-drive-2")
    me.screenshot("agent-recovery-points")

    me.open("/sources")
    me.wait_for("Paired sources")
    page = me.text()
    assert "hq-backup.acme.local" in page and "ACME-001" in page
    assert "newsite.initech.local" in page
    assert "laptop-7.unknown.example" in page  # denied, under the other sources on record
    me.screenshot("sources")

    me.open("/audit")
    me.wait_for("pairing.approve")
    page = me.text()
    assert "console:operator" in page and "pairing.deny" in page and "bin.restore" in page
    me.screenshot("audit-log")

    _wait_for_sample(server, newsite, restored_at)
    if me.shots is not None:
        seed_usage_history(server)
    me.open("/billing")
    me.wait_for("Monthly report")
    page = me.text()
    assert "ACME-001" in page and "INITECH-5" in page and "Download CSV" in page
    assert browser.find_elements("css selector", ".chart svg polyline")
    me.screenshot("billing")

    # Logging out ends the session: the dashboard asks for a login again.
    me.submit(".topbar button[type=submit]")
    me.wait_for("Use an administrator account")
    me.open("/")
    me.wait_for("Use an administrator account")
    assert "/login" in browser.current_url


def _agent_pk(server: Any, source: identity.Identity, agent_id: str) -> int:
    found = query(
        server,
        "SELECT a.id FROM agents a JOIN master_cores c ON c.id = a.core_pk"
        " WHERE c.core_id = ? AND a.agent_id = ?",
        (source.core_id, agent_id),
    )
    assert len(found) == 1, found
    return int(found[0][0])


def _wait_for_sample(server: Any, source: identity.Identity, after: float) -> None:
    """Until the sampler has recorded what the source stores since `after` (it samples
    every second)."""
    deadline = time.monotonic() + WAIT
    while not query(
        server,
        "SELECT 1 FROM usage_samples s JOIN master_cores c ON c.id = s.core_pk"
        " WHERE c.core_id = ? AND s.stored_bytes > 0 AND s.at > ?",
        (source.core_id, after),
    ):
        assert time.monotonic() < deadline, "no usage sample of the source"
        time.sleep(0.2)
