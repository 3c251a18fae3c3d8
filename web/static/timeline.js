// Boot timelines from the appliance's events: pure (no DOM, no network), so the page and a test can
// feed it the same events. One boot starts at a node's first DHCP event (or its first boot event when
// no DHCP was seen) and each step is timed from there. The last step the appliance can see is the
// node's iSCSI login to its root disk (its session, from the target; `mark` records it): what the node
// mounts after that it says only on its own console.

export const STEPS = [
  ["dhcp", "DHCP offer"],
  ["loader", "loader"],
  ["config", "config"],
  ["kernel", "kernel"],
  ["initrd", "initrd"],
  ["login", "iSCSI login · root disk"],
];
const ORDER = Object.fromEntries(STEPS.map(([name], i) => [name, i]));
const NEW_BOOT_AFTER = 600; // s of silence after which a node's next DHCP is a new boot in any case
const HELD = 120; // s that a fetch nobody claimed yet (pxelinux.0 names no server) waits for its node

// The step a fetched file stands for (TFTP or HTTP): a loader, a boot config, a kernel or an initrd.
export function fileStep(file) {
  const path = String(file || "").split("?")[0].replace(/^\/+/, "");
  const base = path.split("/").pop().toLowerCase();
  if (/(^|\/)pxelinux\.cfg\//.test(path) || base.endsWith(".ipxe") || /^grub\.cfg/.test(base)) return "config";
  if (/vmlinuz|bzimage|^kernel|^linux$/.test(base)) return "kernel";
  if (/initrd|initramfs/.test(base)) return "initrd";
  return "loader";
}

function clientIp(event) {
  const client = String(event.client || "");
  if (event.kind === "tftp") {
    const m = /^\[?(.*?)\]?:(\d+)$/.exec(client); // "ip:port" (TFTP names the client's port too)
    return m ? m[1] : client;
  }
  return client;
}

// What one event says about a boot: {step, ok, detail} or null when it is not a boot event.
export function classify(event) {
  const k = event.kind;
  if (k === "dhcp") {
    return { step: "dhcp", ok: true, detail: `${event.reply || "reply"} ${event.file || ""} (arch ${event.arch ?? "?"})` };
  }
  if (k === "tftp" || k === "http") {
    const ok = k === "tftp" ? event.outcome === "ok" : [200, 206, 304].includes(Number(event.status));
    const how = k === "tftp" ? event.outcome : `HTTP ${event.status}`;
    return { step: fileStep(event.file), ok, detail: `${k} ${event.file} ${ok ? fmtBytes(event.bytes) : how}` };
  }
  if (k === "denied") {
    return { step: fileStep(event.file), ok: false, detail: `denied: ${event.reason || event.file}` };
  }
  if (k === "session" || k === "iscsi" || k === "login") {
    const failed = event.ok === false || /fail|refus|denied/.test(String(event.outcome || event.state || ""));
    const gone = /logout|ended|closed/.test(String(event.action || event.state || ""));
    if (gone) return null;
    return { step: "login", ok: !failed,
             detail: `iSCSI ${event.initiator || ""} ${event.address || event.client || ""}`.trim() };
  }
  return null;
}

export function fmtBytes(n) {
  const v = Number(n) || 0;
  if (v >= 2 ** 30) return `${(v / 2 ** 30).toFixed(1)} GiB`;
  if (v >= 1 << 20) return `${(v / (1 << 20)).toFixed(1)} MiB`;
  if (v >= 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${v} B`;
}

export class Timelines {
  constructor() {
    this.boots = new Map(); // server uuid -> its latest boot
    this.held = new Map(); // client ip -> [events nobody claimed yet]
    this.owners = new Map(); // client ip -> server uuid it was last seen booting
  }

  // Feed one event (in id order); returns the server whose timeline changed, or null.
  add(event) {
    const what = classify(event);
    if (!what) return null;
    const ip = clientIp(event);
    let server = typeof event.server === "string" && event.server ? event.server : null;
    if (!server && ip && ip !== "0.0.0.0") server = this.owners.get(ip) || null;
    if (!server) {
      if (ip && ip !== "0.0.0.0") {
        const list = (this.held.get(ip) || []).filter((e) => event.at - e.at < HELD);
        list.push(event);
        this.held.set(ip, list.slice(-20));
      }
      return null;
    }
    if (what.step === "dhcp") {
      const boot = this.boots.get(server);
      if (!boot || boot.reached > 0 || event.at - boot.last > NEW_BOOT_AFTER) this.boots.set(server, newBoot(server, event.at));
    }
    if (ip && ip !== "0.0.0.0" && what.ok) { // a refused fetch came from someone else than the node
      this.owners.set(ip, server);
      const waiting = this.held.get(ip);
      if (waiting) {
        this.held.delete(ip);
        for (const e of waiting) if (event.at - e.at < HELD) this._record(server, e, classify(e));
      }
    }
    this._record(server, event, what);
    return server;
  }

  _record(server, event, what) {
    let boot = this.boots.get(server);
    if (!boot) {
      boot = newBoot(server, event.at);
      this.boots.set(server, boot);
    }
    if (event.at < boot.start) boot.start = event.at; // a held loader fetch older than the first event seen
    boot.last = Math.max(boot.last, event.at);
    boot.address = clientIp(event) !== "0.0.0.0" ? clientIp(event) || boot.address : boot.address;
    const step = boot.steps[what.step];
    if (what.ok) {
      if (!step || !step.ok) boot.steps[what.step] = { at: event.at, ok: true, detail: what.detail, count: 1 };
      else step.count += 1;
      boot.reached = Math.max(boot.reached, ORDER[what.step]);
    } else if (!step || !step.ok) {
      boot.steps[what.step] = { at: event.at, ok: false, detail: what.detail, count: (step?.count || 0) + 1 };
    }
  }

  // A step seen some other way than by an event (the iSCSI session, from the diagnosis).
  mark(server, step, at, detail) {
    const boot = this.boots.get(server);
    if (!boot || boot.steps[step]?.ok) return false;
    this._record(server, { at, client: "" }, { step, ok: true, detail });
    return true;
  }

  get(server) {
    return this.boots.get(server) || null;
  }

  all() {
    return [...this.boots.values()].sort((a, b) => b.last - a.last);
  }
}

function newBoot(server, at) {
  return { server, start: at, last: at, reached: -1, steps: {}, address: "" };
}

// "+2.6 s" from the boot's first event.
export function offset(boot, step) {
  const s = boot.steps[step];
  return s ? `+${(s.at - boot.start).toFixed(1)} s` : "";
}
