"""Drives the statemesh web console in headless Chromium (Debian's, through Playwright's
Python package; Playwright's own browser download is not used).

    python console_check.py URL ADDRESS DEAD_LETTER_ID SCREENSHOT_DIR

Loads URL/ui, waits for the first refresh, reads the members table and the key-group grid,
looks ADDRESS up, replays the dead letter DEAD_LETTER_ID with its button, and prints one JSON
object with what it saw. Screenshots go to SCREENSHOT_DIR.
"""
import json
import os
import sys

from playwright.sync_api import sync_playwright

url, address, letter, shots = sys.argv[1:5]
os.makedirs(shots, exist_ok=True)
seen = {"console_errors": []}
with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ],
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(m.text))
    page.on("pageerror", lambda e: seen["console_errors"].append(str(e)))
    page.goto(url + "/ui")
    page.wait_for_selector("body[data-loaded=true]", timeout=20000)
    # A second refresh gives the per-second rates.
    page.wait_for_timeout(2500)
    seen["title"] = page.title()
    seen["summary"] = page.inner_text("[data-testid=summary]")
    seen["members"] = page.eval_on_selector_all(
        "#members tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    seen["key_group_cells"] = page.eval_on_selector_all("#kg-grid > div", "c => c.length")
    seen["key_group_colored"] = page.eval_on_selector_all(
        "#kg-grid > div", "cs => cs.filter(c => c.style.background !== '').length")
    seen["kg_count"] = page.inner_text("[data-testid=kg-count]")
    seen["legend"] = page.inner_text("#kg-legend")
    seen["checkpoints"] = page.inner_text("[data-testid=cp-summary]")
    seen["chart_points"] = page.eval_on_selector(
        "#cp-bytes polyline", "l => l ? l.getAttribute('points').split(' ').length : 0")
    seen["functions"] = page.eval_on_selector_all(
        "#functions tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    seen["functions_scope"] = page.inner_text("[data-testid=functions-scope]")
    seen["dead_letters_before"] = page.eval_on_selector_all(
        "#dead-letters tbody tr", "rows => rows.map(r => r.dataset.id)")
    page.screenshot(path=os.path.join(shots, "console.png"), full_page=True)

    page.fill("#state-address", address)
    page.click("#state-form button[type=submit]")
    page.wait_for_selector("[data-testid=state-result] table", timeout=10000)
    seen["state"] = page.eval_on_selector_all(
        "[data-testid=state-result] tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    # Set a state from the console, then read it back.
    page.fill("#edit-name", "total")
    page.fill("#edit-value", "1000")
    page.click("#edit-set")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=state-result] td')].some(td => td.textContent === '1000')",
        timeout=10000)
    seen["state_after_edit"] = page.eval_on_selector_all(
        "[data-testid=state-result] tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    page.locator("#state-section").screenshot(path=os.path.join(shots, "console-state.png"))

    page.locator("#dead-letters tbody tr", has_text=letter).locator("button").click()
    page.wait_for_function(
        "id => ![...document.querySelectorAll('#dead-letters tbody tr')].some(r => r.dataset.id === id)",
        arg=letter, timeout=15000)
    seen["dead_letters_after"] = page.eval_on_selector_all(
        "#dead-letters tbody tr", "rows => rows.map(r => r.dataset.id)")
    page.locator("#dead-letters-section").screenshot(path=os.path.join(shots, "console-dead-letters.png"))
    browser.close()
print(json.dumps(seen))
