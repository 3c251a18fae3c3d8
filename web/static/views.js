// Views of the API's answers: pure functions from data to DOM (no state, no network). Text only ever
// goes in as text (dom.js).

import { clock, h, table, when } from "./dom.js";

export function badge(state) {
  return h("span", { class: `badge state-${String(state).replace(/[^a-z_-]/gi, "")}`, text: state });
}

export function gb(bytes) {
  return `${(Number(bytes) / (1 << 30)).toFixed(1)} GB`;
}

export function bar(used, total) {
  const pct = total > 0 ? Math.min(100, Math.round((100 * used) / total)) : 0;
  const meter = h("meter", { min: 0, max: 100, value: pct, high: 85, optimum: 0, title: `${pct} %` });
  return h("span", { class: "bar" }, meter, ` ${pct} %`);
}

export function renderPools(pools) {
  return table(["pool", "used", "free", "export", "status"], pools.map((p) =>
    h("tr", {},
      h("td", { text: p.name }),
      h("td", {}, `${gb(p.used)} of ${gb(p.total)}`, h("br"), bar(p.used, p.total)),
      h("td", { text: gb(p.free) }),
      h("td", { text: p.export?.driver ?? "" }),
      h("td", { class: "detail", text: Object.entries(p.status || {}).map(([k, v]) => `${k}=${v}`).join(" ") }))));
}

export function renderUsers(users) {
  return table(["user", "volumes", "data"], users.map((u) =>
    h("tr", { dataset: { user: u.name } },
      h("td", { text: u.name }),
      h("td", {}, `${u.used_volumes} of ${u.max_volumes}`, h("br"), bar(u.used_volumes, u.max_volumes)),
      h("td", {}, `${u.used_data_gb} of ${u.max_data_gb} GB`, h("br"), bar(u.used_data_gb, u.max_data_gb)))));
}

// The fleet (GET appliances): one row each; `actions(a)` gives the row's buttons (none for a token that
// may not use them). A fleet of one is the usual appliance: its row is drawn compact (class "single").
export function renderAppliances(appliances, actions) {
  const gib = (bytes) => (Number(bytes) / (1 << 30)).toFixed(1);
  const rows = appliances.map((a) => h("tr", { dataset: { appliance: a.name, state: a.state } },
    h("td", {}, h("strong", { text: a.name }), a.api_url ? h("div", { class: "muted", text: a.api_url }) : null),
    h("td", {}, badge(a.state),
      // a down appliance may be disabled too: its state says down, the reason still says why it is off
      a.disabled_reason ? h("div", { class: "detail", text: `disabled: ${a.disabled_reason}` }) : null),
    h("td", { text: a.servers }),
    h("td", {}, `${gib(a.placed_bytes)} / ${gib(a.capacity_bytes)} GiB`, h("br"), bar(a.placed_bytes, a.capacity_bytes)),
    h("td", { class: "templates" }, (a.templates || []).map((t) => h("span", { class: "label", text: t })),
      (a.copying || []).map((t) => h("span", { class: "label copying", text: `${t} copying` }))),
    h("td", { text: age(a.heartbeat_age_s) }),
    h("td", { class: "actions" }, actions(a))));
  const out = table(["appliance", "state", "servers", "placed / capacity", "templates", "heartbeat", ""], rows,
                    "no appliance registered");
  out.classList.toggle("single", appliances.length === 1);
  return out;
}

function age(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s)) return "";
  if (s < 60) return `${s.toFixed(1)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function randomUuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

export function renderDiagnosis(uuid, d) {
  if (!d || !Array.isArray(d.steps)) return [h("p", {}, h("code", { text: uuid })), keyValues(d)];
  return h("div", { class: `diagnosis ${d.ok ? "ok" : "problem"}`, dataset: { server: uuid, problem: d.problem || "" } },
    h("p", {}, h("code", { text: uuid }), " ", badge(d.ok ? "ok" : d.problem || "problem"),
      h("span", { class: "muted", text: ` reached: ${d.reached_text || d.reached || "nothing seen"}` })),
    h("p", { class: "summary", text: d.summary || "" }),
    d.hints?.length ? h("ul", { class: "hints" }, d.hints.map((t) => h("li", { text: t }))) : null,
    table(["step", "seen", "when", "detail"], d.steps.map((s) => h("tr", { class: s.seen ? "seen" : "unseen" },
      h("td", { text: s.text || s.step }), h("td", { text: s.seen ? "yes" : "no" }),
      h("td", { text: s.at ? clock(s.at) : "" }), h("td", { class: "detail", text: s.detail || "" })))));
}

export function keyValues(obj) {
  if (obj === null || typeof obj !== "object") return h("span", { text: String(obj) });
  if (Array.isArray(obj)) {
    return h("ul", {}, obj.map((v) => h("li", {}, typeof v === "object" && v !== null ? keyValues(v) : String(v))));
  }
  return h("dl", { class: "kv" }, Object.entries(obj).flatMap(([k, v]) => [
    h("dt", { text: k }),
    h("dd", {}, v !== null && typeof v === "object" ? keyValues(v) : String(v ?? "")),
  ]));
}

export function renderAudit(entries) {
  const list = Array.isArray(entries) ? entries : entries?.entries || [];
  const cell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v ?? ""));
  const rows = list.slice(0, 50).map((a) => h("tr", {},
    h("td", { text: when(a.at ?? a.time ?? a.when) }),
    h("td", { text: cell(a.who ?? a.actor ?? a.user) }),
    h("td", { text: [a.method, a.path ?? a.what ?? a.action].filter(Boolean).join(" ") }),
    h("td", { class: "detail", text: cell(a.result ?? a.status ?? a.outcome) })));
  return table(["when", "who", "what", "result"], rows, "no entries");
}

const SUMMARY = { dhcp: ["reply", "file", "mac", "client"], tftp: ["file", "bytes", "outcome", "client"],
                  http: ["file", "status", "bytes", "client"], workflow: ["workflow", "step", "state"],
                  build: ["line"], service: ["service", "enabled"], export: ["reason", "targets"],
                  denied: ["file", "client", "via"] };

export function summarize(e) {
  const skip = new Set(["id", "at", "kind", "server"]);
  const first = (SUMMARY[e.kind] || []).filter((k) => k in e);
  const rest = Object.keys(e).filter((k) => !skip.has(k) && !first.includes(k)).sort();
  return [...first, ...rest].filter((k) => e[k] !== "" && e[k] !== null && e[k] !== undefined)
    .map((k) => `${k}=${typeof e[k] === "object" ? JSON.stringify(e[k]) : e[k]}`).join(" ");
}
