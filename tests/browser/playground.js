// Drives the serving playground in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core: no browser download). Run by tests/integration/serving/test_serving.py:
//
//   node tests/browser/playground.js <base url> <api key> <png file> [chromium path] [release id]
//
// Chooses the release in the list (when given), uploads the image, reads the scores, moves the t slider from 1 down to 0 with the keyboard,
// reads the scores again, and prints one JSON object on stdout. Exits non-zero on failure.
"use strict";
const { chromium } = require("playwright-core");

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run"];

async function scores(page) {
  return page.$$eval("#scores tbody tr", (rows) =>
    rows.map((r) => ({ label: r.dataset.label, probability: Number(r.dataset.probability) })));
}

async function waitForT(page, t) {
  // The page writes the t of the answer it shows into #status[data-t].
  await page.waitForFunction((want) => {
    const status = document.getElementById("status");
    return status && status.dataset.t !== undefined && Number(status.dataset.t) === want
      && document.querySelectorAll("#scores tbody tr").length > 0;
  }, t, { timeout: 30000 });
}

async function main() {
  const [url, key, image, executable = "/usr/bin/chromium", release] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: executable, args: ARGS, headless: true });
  const result = { requests: [], console_errors: [] };
  try {
    const page = await browser.newPage();
    page.on("request", (r) => result.requests.push(r.url()));
    page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text()); });
    await page.goto(url + "/", { waitUntil: "load" });
    await page.fill("#key", key);
    await page.dispatchEvent("#key", "change");
    if (release) {  // the list is filled from /v1/models once the key is set
      await page.waitForSelector(`#model option[value="${release}"]`, { state: "attached", timeout: 30000 });
      await page.selectOption("#model", release);
      result.release_option = await page.textContent(`#model option[value="${release}"]`);
    }
    await page.setInputFiles("#file", image);
    await waitForT(page, 1);
    result.t_before = await page.textContent("#t-value");
    result.before = await scores(page);

    await page.focus("#t");
    for (let i = 0; i < 20; i++) await page.keyboard.press("ArrowLeft"); // 20 steps of 0.05: t = 1 → 0
    await waitForT(page, 0);
    result.t_after = await page.textContent("#t-value");
    result.after = await scores(page);
    result.status = await page.textContent("#status");
    result.error = await page.textContent("#error");
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack || err) + "\n");
  process.exit(1);
});
