// Drive Debian's Chromium with playwright-core (no browser download) through a plan of
// steps read as JSON from stdin; print one JSON report on stdout.
//
// Plan: {"timeoutMs": 60000, "viewport": [w, h], "userDataDir": "/tmp/x", "localStorage": {},
//        "steps": [{"goto": url}, {"waitText": "Image Quality Rating"},
//                  {"waitSelector": "css", "state": "visible"}, {"waitCanvas": true},
//                  {"dblclick": "css"}, {"click": "css"}, {"fill": "css", "value": "x"},
//                  {"screenshot": "/path.png"},
//                  {"bodyText": "name"}, {"text": "name", "selector": "css"},
//                  {"count": "name", "selector": "css"}, {"saveHtml": "/path.html"},
//                  {"fetchAttr": "name", "selector": "css", "attr": "data"}]}
// ("fetchAttr" fetches the URL in an element's attribute inside the page, e.g. the blob
// OHIF made of an encapsulated PDF, and reports its length and first bytes.)
// Every wait has a deadline (step "timeoutMs" or the plan's). The report holds the
// steps done, console messages of type error/warning, uncaught page errors, failed
// requests, the texts and counts captured by "bodyText"/"text"/"count" steps, and the
// failing step's error (with a screenshot at "failureScreenshot" if the plan names one).
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '..', '..', 'viewer', 'package.json'));
const { chromium } = require('playwright-core');

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

// A canvas with non-uniform pixels: cornerstone has drawn an image into it.
function canvasDrawn() {
  for (const canvas of document.querySelectorAll('canvas')) {
    if (canvas.width < 64 || canvas.height < 64) continue;
    const probe = document.createElement('canvas');
    probe.width = 64; probe.height = 64;
    const ctx = probe.getContext('2d');
    ctx.drawImage(canvas, 0, 0, 64, 64);
    const px = ctx.getImageData(0, 0, 64, 64).data;
    const seen = new Set();
    for (let i = 0; i < px.length; i += 4) seen.add(px[i]);
    if (seen.size > 8) return true;
  }
  return false;
}

async function runStep(page, step, report, timeout) {
  const t = step.timeoutMs ?? timeout;
  if (step.goto) await page.goto(step.goto, { waitUntil: 'domcontentloaded', timeout: t });
  else if (step.waitText) await page.getByText(step.waitText, { exact: false }).first()
    .waitFor({ state: 'visible', timeout: t });
  else if (step.waitSelector) await page.locator(step.waitSelector).first()
    .waitFor({ state: step.state ?? 'visible', timeout: t });
  else if (step.waitCanvas) await page.waitForFunction(canvasDrawn, null, { timeout: t, polling: 250 });
  else if (step.dblclick) await page.locator(step.dblclick).first().dblclick({ timeout: t });
  else if (step.click) await page.locator(step.click).first().click({ timeout: t });
  else if (step.fill) await page.locator(step.fill).first().fill(step.value, { timeout: t });
  else if (step.screenshot) await page.screenshot({ path: step.screenshot, timeout: t });
  else if (step.bodyText) report.texts[step.bodyText] = await page.locator('body').innerText({ timeout: t });
  else if (step.text) report.texts[step.text] = await page.locator(step.selector).first().innerText({ timeout: t });
  else if (step.count) report.counts[step.count] = await page.locator(step.selector).count();
  else if (step.fetchAttr) report.fetched[step.fetchAttr] = await page.locator(step.selector).first()
    .evaluate(async (el, attr) => {
      const bytes = new Uint8Array(await (await fetch(el.getAttribute(attr))).arrayBuffer());
      return { length: bytes.length, head: String.fromCharCode(...bytes.slice(0, 8)) };
    }, step.attr, { timeout: t });
  else if (step.saveHtml) writeFileSync(step.saveHtml, await page.content());
  else throw new Error(`unknown step ${JSON.stringify(step)}`);
}

async function main() {
  const plan = await readStdin();
  const timeout = plan.timeoutMs ?? 60000;
  const report = {
    done: [], console: [], pageErrors: [], failedRequests: [], texts: {}, counts: {}, fetched: {},
    error: null,
  };
  const [width, height] = plan.viewport ?? [1600, 1000];
  const context = await chromium.launchPersistentContext(plan.userDataDir, {
    executablePath: plan.executablePath ?? '/usr/bin/chromium',
    headless: true, args: FLAGS, viewport: { width, height },
    // e.g. {"username": "admin", "password": "…"}: HTTP Basic for qcnode's console
    ...(plan.httpCredentials ? { httpCredentials: plan.httpCredentials } : {}),
  });
  try {
    // e.g. {"shownTours": "[\"basicViewerTour\"]"}: OHIF's onboarding tour stays closed.
    const storage = plan.localStorage ?? {};
    await context.addInitScript((items) => {
      // Init scripts run in every frame; a PDF or sandboxed frame has no localStorage.
      let store = null;
      try { store = window.localStorage; } catch { store = null; }
      if (!store) return;
      for (const [key, value] of Object.entries(items)) store.setItem(key, value);
    }, storage);
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error' || msg.type() === 'warning') {
        report.console.push({ type: msg.type(), text: msg.text().slice(0, 2000) });
      }
    });
    page.on('pageerror', (err) => report.pageErrors.push(String(err.stack ?? err).slice(0, 2000)));
    page.on('requestfailed', (req) => report.failedRequests.push(`${req.url()} ${req.failure()?.errorText}`));
    for (const step of plan.steps) {
      try {
        await runStep(page, step, report, timeout);
        report.done.push(step);
      } catch (err) {
        report.error = { step, message: String(err.message ?? err).slice(0, 4000) };
        if (plan.failureScreenshot) await page.screenshot({ path: plan.failureScreenshot }).catch(() => {});
        break;
      }
    }
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((err) => { console.error(err); process.exit(2); });
