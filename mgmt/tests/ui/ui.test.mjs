// Browser tests of Keel's web UI, run by mgmt/tests/web_ui.rs against a real
// daemon: Debian's chromium, headless, driven by playwright-core; every page
// visited is checked for console errors and for serious accessibility
// violations (axe-core). `node ui.test.mjs SCENARIO` with the scenario's
// facts in $KEEL_UI (JSON: url, users, names, paths, artifacts dir).
// Exits non-zero, saying which check failed, when one does.

import { chromium } from "playwright-core";
import { readFileSync, mkdirSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import http from "node:http";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const env = JSON.parse(process.env.KEEL_UI);
const scenario = process.argv[2];
const URL0 = env.url;
mkdirSync(env.artifacts, { recursive: true });

let step = "start";
// Each step is said on stderr as it starts, so a hung run shows where.
function setStep(s) {
  step = s;
  process.stderr.write(`[${scenario}] step: ${s}\n`);
}
const log = (m) => console.log(`[${scenario}] ${m}`);
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}
async function waitFor(what, fn, ms = 60000) {
  const t = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// Nothing may hang the suite: a scenario has 8 minutes in all.
setTimeout(() => {
  console.log(`[${scenario}] FAILED at step "${step}": the scenario took over 8 minutes`);
  process.exit(1);
}, 8 * 60 * 1000).unref();

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"],
});

// A page that records console errors and uncaught exceptions; `expectErrors`
// lets a check that provokes one (a refused URL) say so.
async function newPage(ctx) {
  const page = await ctx.newPage();
  page.errors = [];
  page.allowed = [];
  page.on("console", (m) => {
    if (m.type() === "error") page.errors.push(`${page.url()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => page.errors.push(`${page.url()}: uncaught ${e.message}`));
  page.setDefaultTimeout(30000);
  return page;
}
function noErrors(page, where) {
  const bad = page.errors.filter((e) => !page.allowed.some((a) => e.includes(a)));
  page.errors = [];
  check(bad.length === 0, `no console errors on ${where}: ${bad.join(" | ")}`);
}
async function axe(page, where) {
  await page.evaluate(AXE);
  const r = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const serious = r.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  check(serious.length === 0,
    `no serious accessibility violations on ${where}: ` +
    serious.map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join(", ")}`).join("; "));
}
async function visit(page, path, { a11y = true } = {}) {
  setStep(`visit ${path}`);
  const r = await page.goto(URL0 + path);
  await page.waitForLoadState("networkidle").catch(() => {});
  if (a11y) await axe(page, path);
  noErrors(page, path);
  return r;
}
async function login(page, user, pass) {
  setStep(`login ${user}`);
  await page.goto(`${URL0}/login`);
  await page.fill("#user", user);
  await page.fill("#password", pass);
  await Promise.all([page.waitForURL((u) => !u.pathname.startsWith("/login")), page.click('button[type="submit"]')]);
  noErrors(page, "login");
}
async function flash(page) {
  return (await page.locator(".flash").first().textContent({ timeout: 5000 }).catch(() => "")) ?? "";
}
async function shot(page, name) {
  await page.screenshot({ path: `${env.artifacts}/${name}.png`, fullPage: true });
  log(`screenshot ${env.artifacts}/${name}.png`);
}
const navLabels = (page) => page.locator("header nav a").allTextContents();

// A raw WebSocket handshake (Node has no browser to pretend to be): the
// status the daemon answers with.
function wsStatus(path, { origin, cookie }) {
  return new Promise((resolve, reject) => {
    const u = new URL(URL0 + path);
    const headers = {
      Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
    };
    if (origin) headers.Origin = origin;
    if (cookie) headers.Cookie = cookie;
    const req = http.request({ host: u.hostname, port: u.port, path: u.pathname + u.search, headers });
    req.on("upgrade", (res, sock) => { sock.destroy(); resolve(res.statusCode); });
    req.on("response", (res) => { res.resume(); resolve(res.statusCode); });
    req.on("error", reject);
    req.end();
  });
}
// The first `n` events of /ui/live, read raw: with `lastId`, as a
// reconnecting EventSource asks (Last-Event-ID).
function sse(cookie, n, lastId) {
  return new Promise((resolve, reject) => {
    const u = new URL(`${URL0}/ui/live`);
    const headers = { Cookie: cookie, Accept: "text/event-stream" };
    if (lastId !== undefined) headers["Last-Event-ID"] = String(lastId);
    const events = [];
    // However the server answers (or not), in 5 s it is what was read.
    const timer = setTimeout(() => { req.destroy(); resolve(events); }, 5000);
    const req = http.get({ host: u.hostname, port: u.port, path: u.pathname, headers }, (res) => {
      if (res.statusCode !== 200) { clearTimeout(timer); reject(new Error(`/ui/live answered ${res.statusCode}`)); return; }
      let buf = "";
      res.setEncoding("utf8");
      res.on("data", (d) => {
        buf += d;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const ev = {};
          for (const line of block.split("\n")) {
            const [k, ...v] = line.split(":");
            if (k) ev[k] = v.join(":").trimStart();
          }
          if (ev.event === "log") events.push(ev);
          if (events.length >= n) { clearTimeout(timer); req.destroy(); resolve(events); return; }
        }
      });
    });
    req.on("error", (e) => { if (e.code !== "ECONNRESET") reject(e); });
  });
}

async function ticket(page, vm, kind) {
  return page.evaluate(async ([vm, kind]) => {
    const csrf = document.querySelector('meta[name="csrf-token"]').content;
    const r = await fetch("/ui/tickets", { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ vm, kind }) });
    return { status: r.status, body: await r.json() };
  }, [vm, kind]);
}
async function sessionCookie(ctx) {
  const c = (await ctx.cookies()).find((c) => c.name === "keel_session");
  return `keel_session=${c.value}`;
}

// ---------------------------------------------------------------------------

async function roles() {
  const { manager, power, other } = env.users;

  // A Manager sees the whole appliance.
  const mctx = await browser.newContext();
  const m = await newPage(mctx);
  await login(m, manager.name, manager.password);
  await visit(m, "/");
  check((await navLabels(m)).includes("Nodes"), "a manager's navigation has Nodes");
  check(await m.locator(".count").count() >= 4, "the dashboard shows counts");
  await shot(m, "dashboard");
  for (const p of ["/nodes", "/volumes", "/vms", "/vms/new", "/isos", "/library", "/users", "/usage", "/jobs", "/events",
    `/volumes/${env.a_volume}`, `/users/${power.name}`]) {
    await visit(m, p);
  }
  await visit(m, "/volumes");
  check(await m.locator(`a[href="/volumes/${env.a_volume}"]`).count() === 1 &&
    await m.locator(`a[href="/volumes/${env.b_volume}"]`).count() === 1, "a manager lists every tenant's volumes");

  // Keyboard: the first Tab reaches the skip link, which leads to the content.
  setStep("keyboard");
  await visit(m, "/", { a11y: false });
  await m.keyboard.press("Tab");
  check(await m.evaluate(() => document.activeElement?.classList.contains("skip")), "the first Tab is the skip link");

  // Snapshots, clones, resize and exports, through their forms.
  setStep("volume forms");
  await visit(m, `/volumes/${env.a_volume}`);
  await m.fill("#snapname", "s2");
  await Promise.all([m.waitForURL(`${URL0}/volumes/${env.a_volume}`), m.click('form[action$="/snapshots"] button')]);
  check((await flash(m)).includes(`snapshot ${env.a_volume}@s2 taken`), `snapshot taken: ${await flash(m)}`);
  await m.fill("#clone-s2", "a-clone");
  await Promise.all([m.waitForURL(`${URL0}/volumes/a-clone`), m.click('form[action$="/snapshots/s2/clone"] button')]);
  check((await m.locator("dl.kv").first().textContent()).includes(`${env.a_volume}@s2`), "the clone names its origin");
  await visit(m, `/volumes/${env.a_volume}`);
  check((await m.locator("section.danger").textContent()).includes("clone a-clone"), "delete lists the clone that depends on it");
  await m.fill("#rsize", "2G");
  await Promise.all([m.waitForURL(`${URL0}/volumes/${env.a_volume}`), m.click('form[action$="/resize"] button')]);
  check((await flash(m)).includes("is now 2.0 GiB"), `resized: ${await flash(m)}`);
  await m.fill("#initiators", "iqn.2026-12.example:host1");
  await Promise.all([m.waitForURL(`${URL0}/volumes/${env.a_volume}`), m.click('form[action$="/export"] button')]);
  check((await m.locator("dl.kv").nth(1).textContent()).includes("iqn.2026-12.example:host1"), "the export's ACL is saved");
  noErrors(m, "volume forms");

  // Events arrive live on the event log, and a stream resumes after the
  // last id it saw.
  setStep("live events");
  await visit(m, "/events");
  await m.evaluate(() => { window.__sameDocument = true; });
  const before = await m.locator("[data-events] tr").count();
  const p2 = await newPage(mctx);
  await visit(p2, `/volumes/${env.a_volume}`, { a11y: false });
  await p2.fill("#snapname", "s3");
  await Promise.all([p2.waitForURL(`${URL0}/volumes/${env.a_volume}`), p2.click('form[action$="/snapshots"] button')]);
  await p2.close();
  await waitFor("the new event on the open event log", async () =>
    (await m.locator("[data-events] tr").first().textContent()).includes("snapshot.create"), 10000);
  check(await m.locator("[data-events] tr").count() > before, "a row was added");
  check(await m.evaluate(() => window.__sameDocument === true), "no reload: the event came live");
  const mcookie = await sessionCookie(mctx);
  const all = await sse(mcookie, 3, 0);
  check(all.length === 3 && all.every((e, i) => i === 0 || Number(e.id) === Number(all[i - 1].id) + 1),
    `the stream from the start gives events in order with ids: ${JSON.stringify(all.map((e) => e.id))}`);
  const resumed = await sse(mcookie, 2, all[0].id);
  check(resumed.length === 2 && Number(resumed[0].id) === Number(all[0].id) + 1 && resumed[0].data === all[1].data,
    `a stream with Last-Event-ID resumes right after it: ${JSON.stringify(resumed.map((e) => e.id))}`);
  noErrors(m, "live events");

  // A form sent without the CSRF token is refused, and changes nothing.
  setStep("csrf");
  const noToken = await m.request.post(`${URL0}/volumes`, { form: { name: "csrf-probe", size: "1G" }, maxRedirects: 0 });
  check(noToken.status() === 403, `a form without the CSRF token gets 403 (got ${noToken.status()})`);
  const wrongToken = await m.request.post(`${URL0}/volumes`,
    { form: { name: "csrf-probe", size: "1G", _csrf: "0".repeat(64) }, maxRedirects: 0 });
  check(wrongToken.status() === 403, `a form with a wrong CSRF token gets 403 (got ${wrongToken.status()})`);
  const foreign = await m.request.post(`${URL0}/volumes`, {
    form: { name: "csrf-probe", size: "1G", _csrf: await m.locator('meta[name="csrf-token"]').getAttribute("content") },
    headers: { Origin: "http://evil.example" }, maxRedirects: 0 });
  check(foreign.status() === 403, `a form from another origin gets 403 (got ${foreign.status()})`);
  await visit(m, "/volumes");
  check(await m.locator('a[href="/volumes/csrf-probe"]').count() === 0, "the refused forms created nothing");

  // Delete stays disabled until the name is typed.
  setStep("type the name to delete");
  await visit(m, `/volumes/${env.a_scratch}`);
  const del = m.locator('form[data-confirm] button[type="submit"]');
  check(await del.isDisabled(), "delete is disabled before the name is typed");
  await m.fill('form[data-confirm] input[name="confirm"]', env.a_scratch.slice(0, -1));
  check(await del.isDisabled(), "delete stays disabled for a wrong name");
  await m.fill('form[data-confirm] input[name="confirm"]', env.a_scratch);
  check(await del.isEnabled(), "delete is enabled once the name is typed");
  await Promise.all([m.waitForURL(`${URL0}/volumes`), del.click()]);
  check((await flash(m)).includes(`volume ${env.a_scratch} deleted`), "the deletion is reported");
  check(await m.locator(`a[href="/volumes/${env.a_scratch}"]`).count() === 0, "the volume is gone from the list");
  noErrors(m, "delete");

  // The back button works: it is plain navigation.
  setStep("back button");
  await visit(m, "/vms", { a11y: false });
  await visit(m, "/isos", { a11y: false });
  await m.goBack();
  check(new URL(m.url()).pathname === "/vms", `back returns to /vms (at ${m.url()})`);

  // Dark theme, and a phone's width.
  setStep("theme");
  await m.click("[data-theme-toggle]");
  const theme = await m.evaluate(() => document.documentElement.dataset.theme);
  check(theme === "dark" || theme === "light", "the theme button sets a theme");
  await axe(m, "/vms in the other theme");
  await m.setViewportSize({ width: 390, height: 844 });
  await visit(m, "/");
  const overflow = await m.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `the dashboard fits a phone's width (overflows by ${overflow}px)`);
  await shot(m, "dashboard-phone");
  await mctx.close();

  // A Power User sees its tenant only, with its quota where it bites.
  setStep("power user");
  const pctx = await browser.newContext();
  const p = await newPage(pctx);
  await login(p, power.name, power.password);
  await visit(p, "/");
  check(!(await navLabels(p)).includes("Nodes"), "a power user's navigation has no Nodes");
  await visit(p, "/volumes");
  check(await p.locator(`a[href="/volumes/${env.a_volume}"]`).count() === 1, "a power user sees its tenant's volume");
  check(await p.locator(`a[href="/volumes/${env.b_volume}"]`).count() === 0, "a power user does not see another tenant's");
  check((await p.locator("[data-quota-left]").textContent()).includes("left"), "the storage quota left is shown");
  // Too big for the quota: said before sending...
  await p.fill("#vname", "too-big");
  await p.fill("#vsize", "100G");
  check(await p.locator("[data-size-warning]").isVisible(), "the form warns before sending what the quota refuses");
  // ...and if sent anyway, the API's reason comes back.
  await Promise.all([p.waitForURL(`${URL0}/volumes`), p.evaluate(() => {
    document.getElementById("vsize").setCustomValidity("");
    document.getElementById("vsize").form.submit();
  })]);
  const why = await flash(p);
  check(why.includes("quota") && why.includes("exceeded"), `the API's refusal is shown: ${why}`);
  noErrors(p, "quota refusal");
  // Another tenant's URLs are refused.
  for (const path of [`/volumes/${env.b_volume}`, "/nodes", `/users/${other.name}`]) {
    p.allowed.push("the server responded with a status of");
    const r = await p.goto(URL0 + path);
    check(r.status() === 404 || r.status() === 403, `${path} is refused to another tenant (got ${r.status()})`);
    noErrors(p, path);
    p.allowed = [];
  }
  await pctx.close();

  // A page without a session goes to the login page, and back after it.
  setStep("login redirect");
  const actx = await browser.newContext();
  const a = await newPage(actx);
  await a.goto(`${URL0}/volumes/${env.a_volume}`);
  check(new URL(a.url()).pathname === "/login", "no session: the login page");
  await axe(a, "/login");
  await a.fill("#user", power.name);
  await a.fill("#password", "wrong password");
  a.allowed.push("status of 401");
  await Promise.all([a.waitForResponse((r) => r.url().endsWith("/login") && r.request().method() === "POST"),
    a.click('button[type="submit"]')]);
  await a.waitForLoadState();
  const refusal = await flash(a);
  check(refusal.includes("wrong user name or password"), `a wrong password is refused with a reason: ${refusal}`);
  check(await a.inputValue("#user") === power.name, "the user name stays filled in");
  noErrors(a, "wrong password");
  a.allowed = [];
  await a.fill("#password", power.password);
  await Promise.all([a.waitForURL(`${URL0}/volumes/${env.a_volume}`), a.click('button[type="submit"]')]);
  noErrors(a, "login redirect");
  const cookie = (await actx.cookies()).find((c) => c.name === "keel_session");
  check(cookie && cookie.httpOnly && cookie.secure && cookie.sameSite === "Strict",
    `the session cookie is HttpOnly, Secure, SameSite=Strict: ${JSON.stringify(cookie)}`);
  const csp = (await a.request.get(`${URL0}/`)).headers()["content-security-policy"];
  check(csp && csp.includes("script-src 'self'") && !csp.includes("unsafe"), `a strict CSP: ${csp}`);
  await actx.close();
}

// ---------------------------------------------------------------------------

async function manager() {
  const { manager } = env.users;
  const ctx = await browser.newContext();
  const m = await newPage(ctx);
  await login(m, manager.name, manager.password);

  // Upload the ISO through the ISO store's page.
  setStep("upload ISO");
  await visit(m, "/isos");
  await m.fill("#isoname", "guest");
  await m.setInputFiles("#isofile", env.iso);
  await Promise.all([m.waitForURL(`${URL0}/isos`), m.click('#iso-upload button[type="submit"]')]);
  await m.waitForSelector("td:text-is('guest')");
  noErrors(m, "ISO upload");

  // A volume.
  setStep("create volume");
  await visit(m, "/volumes");
  await m.fill("#vname", "data1");
  await m.fill("#vsize", "1G");
  await Promise.all([m.waitForURL(`${URL0}/volumes/data1`), m.click('form[action="/volumes"] button[type="submit"]')]);
  check((await flash(m)).includes("volume data1 created"), "the volume is created");
  check((await m.locator("code.copy").first().textContent()).startsWith("nbd://"), "the volume page shows its NBD URL");
  await visit(m, "/volumes/data1");

  // A VM from the ISO, started.
  setStep("create VM");
  await visit(m, "/vms/new");
  await m.fill("#name", "web");
  await m.fill("#memory", "256M");
  await m.fill("#disk", "1G");
  await m.selectOption("#iso", "guest");
  await Promise.all([m.waitForURL(`${URL0}/vms/web`), m.click('form[action="/vms"] button[type="submit"]')]);
  check((await flash(m)).includes("VM web created"), `the VM is created: ${await flash(m)}`);
  check((await m.locator("[data-vm-state]").textContent()).includes("running"), "the VM runs");
  await visit(m, "/vms/web");
  await shot(m, "vm");

  // Its serial console shows the guest booting, and typing reaches it.
  setStep("serial console");
  await Promise.all([m.waitForURL(`${URL0}/vms/web/serial`), m.click("text=Serial console")]);
  await m.waitForSelector('#serial-term[data-connected="true"]');
  const text = () => m.evaluate(() => window.keelTerminalText());
  await waitFor("the guest's boot on the serial console", async () => (await text()).includes("KEEL-GUEST-READY"), 120000);
  check((await text()).includes("ISOLINUX"), "the console shows the boot from the CD's boot loader");
  await m.click("#serial-term");
  await m.keyboard.type("hello-keel");
  await m.keyboard.press("Enter");
  await waitFor("the guest to echo what was typed", async () => (await text()).includes("KEEL-GUEST TYPED hello-keel"));
  // A second viewer gets the boot replayed, and sees what the first types.
  const m2 = await newPage(ctx);
  await m2.goto(`${URL0}/vms/web/serial`);
  await m2.waitForSelector('#serial-term[data-connected="true"]');
  const text2 = () => m2.evaluate(() => window.keelTerminalText());
  await waitFor("the replayed boot log", async () => (await text2()).includes("ISOLINUX"));
  check((await text2()).includes("KEEL-GUEST TYPED hello-keel"), "the second viewer gets the history");
  await m2.click("#serial-term");
  await m2.keyboard.type("from-two");
  await m2.keyboard.press("Enter");
  await waitFor("the first viewer to see the second's typing", async () => (await text()).includes("KEEL-GUEST TYPED from-two"));
  await axe(m, "serial console");
  noErrors(m, "serial console");
  noErrors(m2, "second serial console");
  await shot(m, "serial-console");
  await m2.close();

  // Clone it while it runs.
  setStep("clone");
  await visit(m, "/vms/web");
  await m.fill("#clone", "web2");
  await Promise.all([m.waitForURL(`${URL0}/vms/web2`, { timeout: 120000 }), m.click('form[action="/vms/web/clone"] button')]);
  check((await flash(m)).includes("cloned from web"), `the clone is made: ${await flash(m)}`);
  check((await m.locator("[data-vm-state]").textContent()).includes("running"), "the clone runs");
  noErrors(m, "clone");

  // Back it up, and watch the job reach 100 % without a reload.
  setStep("backup");
  // Give the disk some data, so the backup takes long enough to watch.
  const url = (await (await m.request.get(`${URL0}/api/v1/volumes/web-disk0`, { headers: { Authorization: `Bearer ${env.token}` } })).json()).nbd_url;
  const rnd = `${env.artifacts}/random.bin`;
  writeFileSync(rnd, randomBytes(env.backup_bytes));
  execFileSync("qemu-io", ["-f", "raw", "-c", `write -s ${rnd} 64M ${env.backup_bytes}`, url], { stdio: "pipe" });
  await visit(m, "/vms/web");
  await m.fill("#bname", "web-backup");
  await Promise.all([m.waitForURL(/\/jobs\/\d+$/), m.click('form[action="/vms/web/backup"] button')]);
  await m.evaluate(() => { window.__sameDocument = true; });
  const job = m.locator("[data-job]").first();
  const seenBelow = await job.getAttribute("data-state") !== "done" &&
    !(await m.locator("[data-pct]").first().textContent()).startsWith("100");
  const pcts = [];
  await waitFor("the backup job to finish", async () => {
    pcts.push(await m.locator("[data-pct]").first().textContent());
    return (await job.getAttribute("data-state")) === "done";
  }, 180000);
  check(seenBelow, `the job page saw the job before it finished (${pcts.slice(0, 5).join(", ")})`);
  check((await m.locator("[data-pct]").first().textContent()).trim() === "100 %", "the progress reached 100 %");
  check(await m.evaluate(() => window.__sameDocument === true), "no reload: the progress came live");
  log(`backup progress seen: ${[...new Set(pcts)].join(" ")}`);
  noErrors(m, "backup job");
  await visit(m, "/library");
  check(await m.locator('a[href="/library/web-backup"]').count() === 1, "the backup is in the library");
  await shot(m, "library");
  await visit(m, "/library/web-backup");
  await visit(m, "/jobs");
  await visit(m, "/");
  await shot(m, "dashboard-busy");
  await ctx.close();
}

// ---------------------------------------------------------------------------

async function regular() {
  const { regular } = env.users;
  const vm = env.vm;
  const ctx = await browser.newContext();
  const r = await newPage(ctx);
  await login(r, regular.name, regular.password);
  setStep("regular lands on its VM");
  check(new URL(r.url()).pathname === `/vms/${vm}`, `a regular user lands on its VM (at ${r.url()})`);
  check(JSON.stringify(await navLabels(r)) === JSON.stringify(["My VM"]), "a regular user's navigation is its VM");
  await visit(r, `/vms/${vm}`);
  check(await r.locator("text=Back up").count() === 0 && await r.locator("text=Clone VM").count() === 0,
    "a regular user gets no clone or backup");
  for (const path of ["/volumes", `/vms/${env.other_vm}`, "/users"]) {
    r.allowed.push("the server responded with a status of");
    const res = await r.goto(URL0 + path);
    check(res.status() === 403 || res.status() === 404, `${path} is refused to a regular user (got ${res.status()})`);
    noErrors(r, path);
    r.allowed = [];
  }

  // Shut down (ACPI): the page follows the VM to stopped by itself.
  setStep("shut down");
  await visit(r, `/vms/${vm}`);
  // (The guest arms its power button watcher before it says it is ready.)
  await waitFor("the guest to be ready", async () => {
    const c = await r.request.get(`${URL0}/api/v1/vms/${vm}/console`, { headers: { Authorization: `Bearer ${env.token}` } });
    return (await c.text()).includes("KEEL-GUEST-READY");
  }, 90000);
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}`), r.click("text=Shut down")]);
  await waitFor("the VM page to show the guest powered itself off", async () =>
    (await r.locator("[data-vm-state]").getAttribute("data-vm-state").catch(() => "")) === "stopped", 90000);
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}`), r.click("text=Power on")]);
  await waitFor("powered on again", async () =>
    (await r.locator("[data-vm-state]").getAttribute("data-vm-state").catch(() => "")) === "running", 30000);
  noErrors(r, "shut down");

  // Power off, and on again.
  setStep("power");
  await visit(r, `/vms/${vm}`);
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}`), r.click("text=Power off")]);
  await waitFor("powered off", async () =>
    (await r.locator("[data-vm-state]").getAttribute("data-vm-state").catch(() => "")) === "stopped", 30000);
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}`), r.click("text=Power on")]);
  await waitFor("powered on", async () =>
    (await r.locator("[data-vm-state]").getAttribute("data-vm-state").catch(() => "")) === "running", 30000);
  noErrors(r, "power");

  // Change the CD, and see the guest notice it.
  setStep("change CD");
  await r.selectOption("#cd", env.iso_name);
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}`), r.click('form[action$="/cdrom"] button')]);
  check((await flash(r)).includes(`CD ${env.iso_name} is in the drive`), `the CD is changed: ${await flash(r)}`);
  await r.goto(`${URL0}/vms/${vm}/serial`);
  await r.waitForSelector('#serial-term[data-connected="true"]');
  await waitFor("the guest to see the new CD", async () =>
    (await r.evaluate(() => window.keelTerminalText())).includes(`KEEL-GUEST CD ${env.iso_label}`), 90000);
  noErrors(r, "serial console");

  // The graphical console: noVNC draws the VM's screen.
  setStep("graphical console");
  await visit(r, `/vms/${vm}`, { a11y: false });
  await Promise.all([r.waitForURL(`${URL0}/vms/${vm}/console`), r.click("text=Graphical console")]);
  await r.waitForSelector('#vnc-screen[data-connected="true"]');
  const lit = await waitFor("the screen to be drawn", async () => {
    const n = await r.evaluate(() => {
      const c = document.querySelector("#vnc-screen canvas");
      if (!c || !c.width) return 0;
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let lit = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
      return lit;
    });
    return n > 200 ? n : 0;
  }, 60000);
  log(`graphical console: ${lit} lit pixels`);
  await axe(r, "graphical console");
  noErrors(r, "graphical console");
  await shot(r, "console");

  // Tickets: one use, a few seconds, this site only, this user only.
  setStep("tickets");
  const cookie = await sessionCookie(ctx);
  let t = await ticket(r, vm, "serial");
  check(t.status === 201, `a ticket for the user's own VM (${JSON.stringify(t)})`);
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: "http://evil.example", cookie }) === 403,
    "a ticket used from another origin is refused");
  t = await ticket(r, vm, "serial");
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: URL0, cookie }) === 101, "a fresh ticket opens the console");
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: URL0, cookie }) === 403, "a used ticket is refused");
  t = await ticket(r, vm, "vnc");
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: URL0, cookie }) === 403,
    "a VNC ticket does not open the serial console");
  t = await ticket(r, vm, "serial");
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: URL0 }) === 401, "a ticket without the session is refused");
  t = await ticket(r, vm, "serial");
  await new Promise((res) => setTimeout(res, (env.ticket_ttl + 1) * 1000));
  check(await wsStatus(`/ui/ws/serial?ticket=${t.body.ticket}`, { origin: URL0, cookie }) === 403, "an expired ticket is refused");
  const foreignVm = await ticket(r, env.other_vm, "serial");
  check(foreignVm.status === 404, `no ticket for another user's VM (got ${foreignVm.status})`);
  const noCsrf = await r.evaluate(async (vm) => (await fetch("/ui/tickets", { method: "POST",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ vm, kind: "vnc" }) })).status, vm);
  check(noCsrf === 403, `a ticket request without the CSRF token is refused (got ${noCsrf})`);
  // Tickets asked for and never used are capped per user (16).
  const asked = [];
  for (let i = 0; i < 17; i++) asked.push((await ticket(r, vm, "vnc")).status);
  check(asked[0] === 201 && asked[16] === 429, `unused tickets are capped: ${asked.join(" ")}`);
  await new Promise((res) => setTimeout(res, (env.ticket_ttl + 1) * 1000)); // let them expire
  r.allowed.push("the server responded with a status of");
  noErrors(r, "tickets");

  // An open console ends with the session.
  setStep("console after logout");
  r.allowed = [];
  await r.goto(`${URL0}/vms/${vm}/serial`);
  await r.waitForSelector('#serial-term[data-connected="true"]');
  const other = await newPage(ctx);
  await visit(other, `/vms/${vm}`, { a11y: false });
  await Promise.all([other.waitForURL(/\/login/), other.click("text=Log out")]);
  await r.waitForSelector('#serial-term[data-connected="false"]', { timeout: 10000 });
  await waitFor("the console to say it cannot reconnect, and why", async () =>
    (await r.locator("#serial-status").textContent()).includes("Cannot open the console: the session has ended"), 15000);
  await ctx.close();
}

const scenarios = { roles, manager, regular };
try {
  check(scenarios[scenario], `unknown scenario ${scenario}`);
  await scenarios[scenario]();
  log("all checks passed");
  await browser.close();
} catch (e) {
  console.log(`[${scenario}] FAILED at step "${step}": ${e.stack ?? e}`);
  await browser.close().catch(() => {});
  process.exit(1);
}
