// The Cello dashboard: log in with a token, show what the API lets this token see, act through the API.
// Panels whose routes answer 403 (admin routes, for a user token) are hidden; routes this appliance does
// not serve (404) say "not available". A read-only token (GET /token says scope "read") gets no control
// that writes. Every value reaches the DOM as text (dom.js).

import { Api, seg } from "./api.js";
import { clock, h, replace, table, when } from "./dom.js";
import { EventStream } from "./events.js";
import { STEPS, Timelines, fmtBytes, offset } from "./timeline.js";
import { badge, randomUuid, renderAppliances, renderAudit, renderDiagnosis, renderPools, renderUsers, summarize }
  from "./views.js";

const TOKEN_KEY = "cello.token";
const REFRESH_MS = 5000;
const MAX_EVENTS = 150;

const $ = (id) => document.getElementById(id);

const st = {
  api: null,
  admin: false,
  readOnly: false, // a token of scope "read": every write would be refused (403), so none is drawn
  me: null, // a user token's own user name, once a server of its own names it
  servers: [],
  templates: [],
  users: [],
  builds: new Map(), // build id -> {id, template, state, lines}
  timelines: new Timelines(),
  stream: null,
  timer: null,
  loginTimer: null,
  armed: new Map(), // button key -> time a destructive click was armed
  diagnosing: null,
  adoptChoice: new Map(), // mac -> {template, user} picked in its adopt form (kept across redraws)
};

// --- login ------------------------------------------------------------------------------------

function showLogin(error = "") {
  $("app-view").hidden = true;
  $("logout").hidden = true;
  $("role").textContent = "";
  $("login-view").hidden = false;
  $("login-error").textContent = error;
  $("token").focus();
}

async function login(token) {
  const api = new Api(token);
  try {
    await api.get("/servers");
  } catch (e) {
    showLogin(e.status === 401 ? "That token was refused." : e.message);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  st.api = api;
  try {
    st.users = await api.get("/users");
    st.admin = true;
  } catch (e) {
    st.admin = false;
    if (e.status !== 403) say(`users: ${e.message}`, true);
  }
  try {
    st.readOnly = (await api.get("/token")).scope === "read";
  } catch (e) {
    st.readOnly = false; // the appliance still refuses what the token may not do
    say(`token: ${e.message}`, true);
  }
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  $("logout").hidden = false;
  document.body.classList.toggle("is-admin", st.admin);
  for (const el of document.querySelectorAll("[data-admin]")) el.hidden = !st.admin;
  $("role").textContent = `${st.admin ? "admin token" : "user token"}${st.readOnly ? " (read-only)" : ""}`;
  st.stream = new EventStream(api, { onEvent, onState: streamState, since: 0 }).start();
  await refreshAll();
  st.timer = setInterval(refreshAll, REFRESH_MS);
  st.loginTimer = setInterval(checkLogins, LOGIN_POLL_MS);
}

function logout(reason = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  if (st.stream) st.stream.stop();
  if (st.timer) clearInterval(st.timer);
  if (st.loginTimer) clearInterval(st.loginTimer);
  Object.assign(st, { api: null, admin: false, readOnly: false, me: null, servers: [], templates: [], users: [],
                      stream: null, timer: null, loginTimer: null, timelines: new Timelines(), builds: new Map(),
                      armed: new Map(), adoptChoice: new Map() });
  // nothing of this token's page stays for the next one (its forms included)
  for (const el of document.querySelectorAll("#app-view section .body")) {
    if (!el.querySelector("#event-list")) replace(el);
  }
  replace($("event-list"));
  $("panel-diagnosis").hidden = true;
  say("");
  showLogin(reason);
}

// --- helpers ----------------------------------------------------------------------------------

// Whether this token's page draws controls that write: any of its owner's (mayWrite), an admin's (mayManage).
const mayWrite = () => !st.readOnly;
const mayManage = () => st.admin && !st.readOnly;

function say(text, bad = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", bad);
}

function body(panel) {
  return $(`panel-${panel}`).querySelector(".body");
}

// Load a panel's data: 403 hides the panel, 404 says the appliance does not offer it (yet).
async function load(panel, path, render) {
  const section = $(`panel-${panel}`);
  if (!st.api) return null;
  try {
    const data = await st.api.get(path);
    section.hidden = false;
    section.classList.remove("unavailable");
    render(data);
    return data;
  } catch (e) {
    if (e.status === 401) return logout("The token was refused; log in again.");
    if (e.status === 403) {
      section.hidden = true;
    } else if (e.status === 404 || e.status === 405) {
      section.hidden = false;
      section.classList.add("unavailable");
      replace(body(panel), h("p", { class: "muted", text: "not available on this appliance" }));
    } else {
      section.hidden = false;
      replace(body(panel), h("p", { class: "error", text: e.message }));
    }
    return null;
  }
}

async function act(label, fn) {
  try {
    const out = await fn();
    say(label);
    return out;
  } catch (e) {
    if (e.status === 401) logout("The token was refused; log in again.");
    else say(`${label.split(":")[0]} failed: ${e.message}`, true);
    return null;
  }
}

// A destructive button asks for a second click within 5 s.
function confirmButton(key, label, run) {
  const armedAt = st.armed.get(key);
  const armedNow = armedAt && Date.now() - armedAt < 5000;  // survives the 5 s re-render
  const button = h("button", { type: "button", class: "danger", text: armedNow ? `Really ${label.toLowerCase()}?` : label,
                               dataset: { action: key } });
  button.addEventListener("click", async () => {
    const armed = st.armed.get(key);
    if (!armed || Date.now() - armed > 5000) {
      st.armed.set(key, Date.now());
      button.textContent = `Really ${label.toLowerCase()}?`;
      setTimeout(() => { if (button.isConnected) button.textContent = label; }, 5000);
      return;
    }
    st.armed.delete(key);
    button.disabled = true;
    await run();
  });
  return button;
}

function templateOptions(select, chosen) {
  const names = st.templates.filter((t) => t.versions.length).map((t) => t.name);
  replace(select, names.length ? names.map((n) => h("option", { value: n, text: n, selected: n === chosen }))
    : h("option", { value: "", text: "no template built yet" }));
}

function userOptions(select) {
  replace(select, st.users.map((u) => h("option", { value: u.name, text: u.name })));
}

// --- refresh ----------------------------------------------------------------------------------

let refreshing = false;
async function refreshAll() {
  if (!st.api || refreshing) return; // a slow appliance: one refresh at a time
  refreshing = true;
  try {
    await refreshEverything();
  } finally {
    refreshing = false;
  }
}

async function refreshEverything() {
  await Promise.all([refreshHealth(), refreshServices(), refreshServers(), refreshTemplates(),
                     st.admin ? refreshAdmin() : refreshOwnQuota(), refreshBuilds()]);
}

// The iSCSI login is no event: the target knows the session, and the diagnosis asks it. The boots that
// fetched their initrd within the last 10 minutes and have no login yet are asked about every 2 s (the
// 8 most recent: a boot storm must not become a storm of diagnoses).
const LOGIN_POLL_MS = 2000;
let checkingLogins = false;
async function checkLogins() {
  if (!st.api || checkingLogins) return;
  checkingLogins = true;
  try {
    await askLogins();
  } finally {
    checkingLogins = false;
  }
}

async function askLogins() {
  const now = Date.now() / 1000;
  const waiting = st.timelines.all().filter((b) => b.reached >= STEPS.findIndex(([s]) => s === "initrd")
    && !b.steps.login?.ok && now - b.last < 600 && st.servers.some((s) => s.uuid === b.server)).slice(0, 8);
  await Promise.all(waiting.map(async (boot) => {
    let d;
    try {
      d = await st.api.get(`/servers/${seg(boot.server)}/diagnose`);
    } catch {
      return; // no diagnose route here (yet), or the server went: the timeline stays as the events left it
    }
    const session = (d.steps || []).find((s) => s.step === "iscsi" && s.seen);
    if (session && st.timelines.mark(boot.server, "login", Number(session.at) || now, session.detail || "session")) {
      renderTimeline();
      renderServers();
    }
  }));
}

async function refreshAdmin() {
  await Promise.all([
    load("pools", "/pools", (pools) => replace(body("pools"), renderPools(pools))),
    load("users", "/users", (users) => { st.users = users; replace(body("users"), renderUsers(users)); }),
    load("discovered", "/discovered", renderDiscovered),
    load("audit", "/audit?limit=50", (entries) => replace(body("audit"), renderAudit(entries))),
    refreshAppliances(),
  ]);
}

// --- the fleet --------------------------------------------------------------------------------

// Admin only (refreshAdmin): a user token never asks, the route would refuse it.
function refreshAppliances() {
  return load("appliances", "/appliances", (appliances) =>
    replace(body("appliances"), renderAppliances(appliances, mayManage() ? applianceButton : () => null)));
}

function applianceButton(a) {
  const path = `/appliances/${seg(a.name)}`;
  if (a.disabled_reason || a.state === "disabled") {
    return h("button", { type: "button", text: "Enable", dataset: { action: `enable-${a.name}` },
      onclick: () => act(`appliance ${a.name}: enabled`, () => st.api.call("POST", `${path}/enable`))
        .then(refreshAppliances) });
  }
  return h("button", { type: "button", class: "danger", text: "Disable", dataset: { action: `disable-${a.name}` },
    onclick: async () => {
      // the reason is what other operators (and a refused placement) will read: ask for it
      const reason = window.prompt(`Disable ${a.name}: no new placement there (what it holds keeps running). Reason:`,
                                   "maintenance");
      if (reason === null) return;
      await act(`appliance ${a.name}: disabled`,
        () => st.api.call("POST", `${path}/disable`, reason.trim() ? { reason: reason.trim() } : {}));
      await refreshAppliances();
    } });
}

async function refreshOwnQuota() {
  if (!st.me) return;
  await load("users", `/users/${seg(st.me)}`, (u) => replace(body("users"), renderUsers([u])));
}

async function refreshHealth() {
  try {
    const r = await fetch("/api/v1/health", { cache: "no-store" });
    const health = await r.json();
    const pill = $("health");
    pill.textContent = `${health.status} · ${health.version}`;
    pill.className = `pill ${health.status === "ok" ? "good" : "bad"}`;
  } catch {
    $("health").textContent = "unreachable";
    $("health").className = "pill bad";
  }
}

let serversTimer = null;
function soon(fn) {
  // many events in a burst (a bulk create) cause one refresh
  if (serversTimer) return;
  serversTimer = setTimeout(() => { serversTimer = null; fn(); }, 300);
}

// --- services, pools, users -------------------------------------------------------------------

function refreshServices() {
  return load("services", "/services", (services) => {
    replace(body("services"), table(["service", "state", "enabled", "detail", ""], services.map((s) =>
      h("tr", { dataset: { service: s.name } },
        h("td", { text: s.name }), h("td", {}, badge(s.state)), h("td", { text: s.enabled ? "yes" : "no" }),
        h("td", { class: "detail", text: s.detail }),
        h("td", {}, mayManage() ? h("button", {
          type: "button", text: s.enabled ? "Disable" : "Enable", dataset: { action: `service-${s.name}` },
          onclick: () => act(`${s.name}: ${s.enabled ? "disabled" : "enabled"}`,
            () => st.api.call("PUT", `/services/${seg(s.name)}`, { enabled: !s.enabled })).then(refreshServices),
        }) : null)))));
  });
}

// --- servers ----------------------------------------------------------------------------------

async function refreshServers() {
  await load("servers", "/servers", (servers) => {
    st.servers = servers;
    if (!st.admin && servers.length) st.me = servers[0].user;
    renderServers();
    renderTimeline();
  });
}

function serverForm() {
  const template = h("select", { name: "template", id: "create-template", required: true });
  templateOptions(template);
  const user = h("select", { name: "user", id: "create-user" });
  userOptions(user);
  const uuid = h("input", { name: "uuid", id: "create-uuid", placeholder: "SMBIOS UUID (random if empty)", size: 38 });
  const macs = h("input", { name: "macs", id: "create-macs", placeholder: "52:54:00:…, …", size: 24 });
  const data = h("input", { name: "data", id: "create-data", type: "number", min: 0, placeholder: "GB", size: 4 });
  const form = h("form", { class: "inline", id: "create-server" },
    h("label", {}, "UUID ", uuid), h("label", {}, "template ", template),
    st.admin ? h("label", {}, "user ", user) : null,
    h("label", {}, "MACs ", macs), h("label", {}, "data volume ", data),
    h("button", { type: "submit", text: "Create server" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const req = { uuid: uuid.value.trim() || randomUuid(), template: template.value };
    if (st.admin) req.user = user.value;
    const list = macs.value.split(/[\s,]+/).filter(Boolean);
    if (list.length) req.macs = list;
    if (Number(data.value) > 0) req.data_volumes = [{ size_gb: Number(data.value) }];
    const made = await act(`server ${req.uuid}: creating`, () => st.api.call("POST", "/servers", req));
    if (made) {
      uuid.value = "";
      await refreshServers();
    }
  });
  return form;
}

function renderServers() {
  const panel = body("servers");
  // the create form (and what is typed in it, and the focus) stays across refreshes; only the list is redrawn
  const form = panel.querySelector("#create-server");
  if (!panel.querySelector(".list")) {
    replace(panel, mayWrite() ? serverForm() : null, h("div", { class: "list" }));
  } else if (form) {
    templateOptions(form.querySelector("#create-template"), form.querySelector("#create-template").value);
    const user = form.querySelector("#create-user");
    if (user) {
      const chosen = user.value;
      userOptions(user);
      user.value = chosen || user.value;
    }
  }
  const rows = st.servers.map((s) => {
    const boot = st.timelines.get(s.uuid);
    const reached = boot && boot.reached >= 0 ? STEPS[boot.reached][1] : "—";
    const t = s.target || {};
    return h("tr", { dataset: { server: s.uuid, state: s.state } },
      h("td", {}, h("code", { text: s.uuid }), s.hostname ? h("div", { class: "muted", text: s.hostname }) : null,
        s.macs?.length ? h("div", { class: "muted", text: s.macs.join(" ") }) : null),
      h("td", { text: s.user }),
      h("td", { text: s.appliance || "" }),
      h("td", {}, badge(s.state), s.reason ? h("div", { class: "detail", text: s.reason }) : null),
      h("td", { text: s.version ? `${s.template}@${s.version}` : s.template }),
      h("td", { class: "target" }, h("code", { text: t.iqn || "" }), h("div", { class: "muted", text:
        `${t.portal || ""} · ${t.exported ? "exported" : "not exported"} · ` +
        (t.luns || []).map((l) => `LUN ${l.lun ?? "?"} ${l.volume}`).join(", ") })),
      h("td", { text: t.chap || "" }),
      h("td", {}, Object.entries(s.labels || {}).map(([k, v]) => h("span", { class: "label", text: `${k}=${v}` }))),
      h("td", { text: reached }),
      h("td", { class: "actions" },
        h("button", { type: "button", text: "Diagnose", dataset: { action: `diagnose-${s.uuid}` },
                      onclick: () => diagnose(s.uuid) }),
        mayWrite() ? confirmButton(`delete-${s.uuid}`, "Delete", async () => {
          await act(`server ${s.uuid}: deleted`, () => st.api.call("DELETE", `/servers/${seg(s.uuid)}`, undefined, 600000));
          await refreshServers();
        }) : null));
  });
  replace(panel.querySelector(".list"), table(["server", "user", "appliance", "state", "template", "target", "CHAP", "labels",
    "boot", ""], rows, "no servers"));
}

async function diagnose(uuid) {
  const section = $("panel-diagnosis");
  section.hidden = false;
  st.diagnosing = uuid;
  const out = body("diagnosis");
  replace(out, h("p", { class: "muted", text: `asking about ${uuid}…` }));
  try {
    const d = await st.api.get(`/servers/${seg(uuid)}/diagnose`);
    replace(out, renderDiagnosis(uuid, d));
  } catch (e) {
    const text = e.status === 404 && !/server/i.test(e.message) ? "diagnose is not available on this appliance"
      : e.status === 405 ? "diagnose is not available on this appliance" : e.message;
    replace(out, h("p", { class: e.status === 404 ? "muted" : "error", text: `${uuid}: ${text}` }));
  }
  section.scrollIntoView({ block: "nearest" });
}

// --- boot timeline ----------------------------------------------------------------------------

let timelineFrame = 0;
function renderTimelineSoon() {
  if (!timelineFrame) timelineFrame = requestAnimationFrame(() => { timelineFrame = 0; renderTimeline(); });
}

function renderTimeline() {
  const known = new Set(st.servers.map((s) => s.uuid));
  const boots = st.timelines.all();
  // a boot of a server not listed (deleted since, or not listed yet) stays for 10 minutes
  const now = Date.now() / 1000;
  const order = [...st.servers.map((s) => s.uuid),
                 ...boots.filter((b) => !known.has(b.server) && now - b.last < 600).map((b) => b.server)];
  const rows = order.map((uuid) => {
    const boot = st.timelines.get(uuid);
    const cells = STEPS.map(([step, title], i) => {
      const s = boot?.steps[step];
      const waiting = boot && !s && i === boot.reached + 1;
      const cls = s ? (s.ok ? "step done" : "step failed") : waiting ? "step waiting" : "step";
      return h("td", { class: cls, dataset: { step }, title: s ? s.detail : title },
        h("span", { class: "t", text: s ? offset(boot, step) : waiting ? "…" : "" }),
        s ? h("span", { class: "d", text: s.detail }) : null);
    });
    return h("tr", { dataset: { timeline: uuid } },
      h("td", {}, h("code", { text: uuid }), known.has(uuid) ? null : h("div", { class: "muted", text: "not a server here" })),
      h("td", { text: boot ? clock(boot.start) : "no boot seen" }),
      cells);
  });
  replace(body("timeline"), table(["server", "first event", ...STEPS.map(([, t]) => t)], rows, "no servers"));
}

// --- templates and builds ---------------------------------------------------------------------

function refreshTemplates() {
  return load("templates", "/templates", (templates) => {
    st.templates = templates;
    renderTemplates();
    const form = $("create-template");
    if (form) templateOptions(form, form.value);
  });
}

function renderTemplates() {
  const panel = body("templates");
  let list = panel.querySelector(".list");
  if (!list) {
    list = h("div", { class: "list" });
    replace(panel, mayManage() ? buildForm() : null, list, h("div", { id: "builds" }));
  }
  const rows = st.templates.map((t) => h("tr", { dataset: { template: t.name } },
    h("td", { text: t.name }),
    h("td", {}, t.versions.length ? h("ul", { class: "versions" }, t.versions.map((v) => h("li", {},
      h("strong", { text: v.version }), ` · ${v.clones} clone${v.clones === 1 ? "" : "s"} · ${fmtBytes(v.size)}`,
      ` · from ${v.source} · ${when(v.created_at)}`))) : h("span", { class: "muted", text: "no version" }))));
  replace(list, table(["template", "versions"], rows, "no templates"));
  renderBuilds();
}

function buildForm() {
  const name = h("input", { id: "build-name", placeholder: "template name", value: "tiny", size: 12, required: true });
  const source = h("input", { id: "build-source", placeholder: "source", value: "tiny", size: 28, required: true });
  const form = h("form", { class: "inline", id: "build-template" }, h("label", {}, "name ", name),
    h("label", {}, "from ", source), h("button", { type: "submit", text: "Build template" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const job = await act(`template ${name.value}: build started`,
      () => st.api.call("POST", `/templates/${seg(name.value.trim())}/builds`, { source: source.value.trim() }));
    if (job) {
      st.builds.set(job.id, { id: job.id, template: job.template, state: job.state, lines: job.progress || [] });
      renderBuilds();
    }
  });
  return form;
}

async function refreshBuilds() {
  if (!st.admin) return;
  for (const b of st.builds.values()) {
    if (b.state !== "running") continue;
    try {
      const job = await st.api.get(`/templates/builds/${seg(b.id)}`);
      const wasRunning = b.state === "running";
      Object.assign(b, { state: job.state, lines: job.progress || b.lines, error: job.error });
      if (wasRunning && job.state !== "running") refreshTemplates();
    } catch {
      // a build the appliance forgot (restart): the events said what they said
    }
  }
  renderBuilds();
}

function onBuildEvent(e) {
  let b = st.builds.get(e.build);
  if (!b) {
    b = { id: e.build, template: e.template, state: "running", lines: [] };
    st.builds.set(e.build, b);
  }
  const line = String(e.line || "");
  if (!b.lines.includes(line)) b.lines.push(line);
  if (line.startsWith("built ")) b.state = "done";
  if (line.startsWith("build failed")) b.state = "failed";
  if (b.state !== "running") refreshTemplates();
  renderBuilds();
}

function renderBuilds() {
  const box = $("builds");
  if (!box) return;
  const builds = [...st.builds.values()].slice(-5).reverse();
  replace(box, builds.length ? h("h3", { text: "Builds" }) : null, builds.map((b) => {
    const last = b.lines[b.lines.length - 1] || "";
    return h("div", { class: `build state-${b.state}`, dataset: { build: b.id, state: b.state } },
      h("div", {}, h("strong", { text: b.template }), " ", badge(b.state), " ",
        h("span", { class: "muted", text: `${b.id} · ${b.lines.length} step${b.lines.length === 1 ? "" : "s"}` })),
      b.state === "running" ? h("progress", { title: "building" }) : null,
      h("div", { class: "detail", text: b.error ? `${last} (${b.error})` : last }));
  }));
}

// --- discovered nodes, audit ------------------------------------------------------------------

function renderDiscovered(nodes) {
  const list = Array.isArray(nodes) ? nodes : nodes?.nodes || nodes?.discovered || [];
  replace(body("discovered"), table(["MAC", "UUID", "arch", "vendor class", "first seen", "last seen", "seen", "adopt"],
    list.map((d) => h("tr", { dataset: { mac: d.mac } },
      h("td", {}, h("code", { text: d.mac })), h("td", { text: d.uuid || "" }), h("td", { text: d.arch ?? "" }),
      h("td", { text: d.vendor_class ?? d.vendor ?? "" }), h("td", { text: when(d.first_seen) }),
      h("td", { text: when(d.last_seen) }), h("td", { text: d.count ?? d.seen ?? "" }),
      h("td", {}, d.adopted || d.server ? h("span", { class: "muted", text: `adopted ${d.server || ""}` })
        : mayManage() ? adoptForm(d) : h("span", { class: "muted", text: "not adopted" })))),
    "no unknown PXE client seen"));
}

// A discovered node's adopt form: the template and user picked stay across the 5 s redraws.
function adoptForm(d) {
  const chosen = st.adoptChoice.get(d.mac) || {};
  const template = h("select", { name: "template" });
  templateOptions(template, chosen.template);
  const user = h("select", { name: "user" });
  userOptions(user);
  if (chosen.user) user.value = chosen.user;
  const remember = () => st.adoptChoice.set(d.mac, { template: template.value, user: user.value });
  template.addEventListener("change", remember);
  user.addEventListener("change", remember);
  const adopt = h("button", { type: "submit", text: "Adopt", dataset: { action: `adopt-${d.mac}` } });
  const form = h("form", { class: "inline" }, template, user, adopt);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const done = await act(`${d.mac}: adopted`, () =>
      st.api.call("POST", `/discovered/${seg(d.mac)}/adopt`, { template: template.value, user: user.value }));
    if (done) await Promise.all([refreshServers(), refreshAdmin()]);
  });
  return form;
}

// --- events -----------------------------------------------------------------------------------

function onEvent(e) {
  const list = $("event-list");
  list.prepend(h("li", { dataset: { kind: e.kind } }, h("span", { class: "t", text: clock(e.at) }),
    h("span", { class: `kind kind-${String(e.kind).replace(/[^a-z-]/g, "")}`, text: e.kind }),
    h("code", { text: e.server || "-" }), h("span", { class: "detail", text: summarize(e) })));
  while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();

  if (st.timelines.add(e)) renderTimelineSoon();
  if (e.kind === "build") onBuildEvent(e);
  if (e.kind === "workflow" || e.kind === "export" || e.kind === "power") {
    soon(() => Promise.all([refreshServers(), refreshTemplates(), st.admin ? refreshAdmin() : refreshOwnQuota()]));
  }
  if (e.kind === "service") refreshServices();
  if ((e.kind === "discovered" || e.kind === "adopted") && st.admin) load("discovered", "/discovered", renderDiscovered);
}

function streamState(state, detail) {
  const pill = $("stream");
  pill.textContent = state === "live" ? "events: live" : `events: ${state}`;
  pill.className = `pill ${state === "live" ? "good" : "bad"}`;
  pill.title = detail || "the live event stream";
  if (state === "unauthorized") logout("The token was refused; log in again.");
}

// --- start ------------------------------------------------------------------------------------

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) login(token);
});
$("logout").addEventListener("click", () => logout());

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) login(saved);
else showLogin();

