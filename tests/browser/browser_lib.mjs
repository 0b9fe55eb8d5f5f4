// Shared helpers for the headless-Chromium scripts. playwright-core is not a project
// dependency: install it anywhere (npm install playwright-core) and point NODE_PATH at
// that node_modules folder, or PLAYWRIGHT_CORE at the package folder.
import { createRequire } from "node:module";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const PACK_NAME = "ComfyUI-DPCache";

export function loadPlaywright() {
  const require = createRequire(import.meta.url);
  for (const c of [process.env.PLAYWRIGHT_CORE, "playwright-core"].filter(Boolean)) {
    try {
      return require(c);
    } catch {
      // try the next
    }
  }
  return null;
}

export function findChromium() {
  const cands = [process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
  return cands.find((p) => p && existsSync(p)) ?? null;
}

export async function launch() {
  const pw = loadPlaywright();
  if (!pw) throw new Error("playwright-core not found (set NODE_PATH or PLAYWRIGHT_CORE)");
  const exe = findChromium();
  if (!exe) throw new Error("chromium not found (set CHROMIUM_PATH)");
  const userDataDir = mkdtempSync(join(tmpdir(), "dpcache-chromium-"));
  const args = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ];
  const context = await pw.chromium.launchPersistentContext(userDataDir, {
    executablePath: exe,
    headless: true,
    args,
    viewport: { width: 1600, height: 1000 },
    deviceScaleFactor: 1,
  });
  return context;
}

/** Open the ComfyUI page and record console messages, page errors and failed requests. */
export async function openComfy(context, url, { vueNodes = false } = {}) {
  const page = context.pages()[0] ?? (await context.newPage());
  const log = [];
  page.on("console", (m) => log.push({ kind: m.type(), text: m.text(), url: m.location()?.url ?? "" }));
  page.on("pageerror", (e) => log.push({ kind: "pageerror", text: String(e?.stack || e), url: "" }));
  page.on("requestfailed", (r) => log.push({ kind: "requestfailed", text: r.failure()?.errorText ?? "", url: r.url() }));
  page.on("response", (r) => {
    if (r.status() >= 400) log.push({ kind: "http" + r.status(), text: "", url: r.url() });
  });
  if (vueNodes) {
    // user settings are per user directory; set before the app reads them
    await fetch(url + "/api/settings/Comfy.VueNodes.Enabled", { method: "POST", body: "true" });
  } else {
    await fetch(url + "/api/settings/Comfy.VueNodes.Enabled", { method: "POST", body: "false" });
  }
  for (const [k, v] of [["Comfy.TutorialCompleted", true], ["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasInfo", false]]) {
    await fetch(url + "/api/settings/" + k, { method: "POST", body: JSON.stringify(v) });
  }
  await page.goto(url + "/", { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => !!window.comfyAPI?.app?.app?.graph && !!window.LiteGraph, null, { timeout: 120000 });
  // extensions are registered during app.setup(); give it a moment to settle
  await page.waitForFunction(() => (window.comfyAPI.app.app.extensions?.length ?? 0) > 0, null, { timeout: 60000 });
  await page.waitForTimeout(1500);
  return { page, log };
}

/** Messages that come from this pack (its files, its extension name, its node ids). */
// ComfyUI's frontend asks the Comfy registry about every custom node type it shows (by the type's
// name, so the URL names our nodes); without internet that request fails, and it is not the pack's.
const FRONTEND_REGISTRY = "https://api.comfy.org/";

export function ourProblems(log) {
  const bad = new Set(["error", "pageerror", "requestfailed", "warning"]);
  return log.filter((m) => {
    if (m.url.startsWith(FRONTEND_REGISTRY)) return false;
    const ours =
      m.url.includes(`/extensions/${PACK_NAME}/`) || /dpcache/i.test(m.text) || /dpcache/i.test(m.url);
    return ours && (bad.has(m.kind) || m.kind.startsWith("http"));
  });
}
