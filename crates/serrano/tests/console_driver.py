"""Drives serrano's console (/ui) in headless Chromium through Playwright, pointed at the
system's Chromium (Debian's package; Playwright downloads no browser here).

    console_driver.py BASE_URL ADMIN_KEY SCREENSHOT.png ROLLBACK_VERSION

Logs in, waits until every chart has points and the tables are filled, clicks "roll back to
this" on ROLLBACK_VERSION, waits until the page shows it active, takes a full-page screenshot,
and prints what it saw as JSON. Browser console errors (a CSP violation, a script error) fail it.
"""

import json
import sys

from playwright.sync_api import sync_playwright

base, key, shot, version = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
CHARTS = ["chart-ttft", "chart-itl", "chart-e2e", "chart-throughput", "chart-load"]
TABLES = ["budgets", "tenant-cost", "backend-cost", "backend-spend", "backends", "config-versions", "changes", "audit"]

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/ui")
    page.fill("#key", key)
    page.click("#connect")
    # Selectors, not page functions: the console's CSP forbids the eval those need.
    page.wait_for_selector('body[data-refreshed]:not([data-refreshed="1"])', timeout=30000)
    for c in CHARTS:
        page.wait_for_selector(f'#{c}[data-points]:not([data-points="0"])', timeout=30000)
    points = {c: int(page.get_attribute("#" + c, "data-points")) for c in CHARTS}
    rows = {t: page.locator(f"#{t} tr").count() - 1 for t in TABLES}
    verified = page.text_content("#audit-verify")
    status_before = page.text_content("#status")
    page.click(f'button[data-rollback="{version}"]')
    page.wait_for_selector(f'#config-active:text-is("active version: {version}")', timeout=30000)
    status = page.text_content("#status")
    page.screenshot(path=shot, full_page=True)
    browser.close()

print(json.dumps({
    "points": points,
    "rows": rows,
    "verified": verified,
    "status_before": status_before,
    "status": status,
    "errors": errors,
}))
