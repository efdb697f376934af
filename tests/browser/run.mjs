// Opens a page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core),
// waits for the page to publish its result in `window.mqttResult`, prints it as JSON.
// Usage: node run.mjs <page-url> <timeout-ms> [extra chromium flag...]
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [url, timeoutArg, ...extraFlags] = process.argv.slice(2);
const timeout = Number(timeoutArg || 20000);
const profile = mkdtempSync(join(tmpdir(), 'mqsplice-chromium-'));
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ...extraFlags,
];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args,
    timeout,
  });
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(url, { timeout });
  await page.waitForFunction(() => window.mqttResult !== undefined, null, { timeout });
  const result = await page.evaluate(() => window.mqttResult);
  console.log(JSON.stringify({ ...result, logs }));
} catch (e) {
  console.log(JSON.stringify({ error: String(e) }));
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
}
