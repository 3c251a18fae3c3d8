// The appliance's server-sent events, read with fetch() so that the request carries the bearer token
// (EventSource cannot send one). Reconnects after a drop and goes on from the last event id it saw.

export function parseFrames(buffer, onFrame) {
  // Frames end with a blank line; returns what is left over (a frame not complete yet).
  const text = buffer.replace(/\r\n?/g, "\n");
  let start = 0;
  let end;
  while ((end = text.indexOf("\n\n", start)) !== -1) {
    const frame = { id: null, event: "message", data: [] };
    for (const line of text.slice(start, end).split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") frame.data.push(value);
      else if (field === "id") frame.id = value;
      else if (field === "event") frame.event = value;
    }
    if (frame.data.length) onFrame(frame);
    start = end + 2;
  }
  return text.slice(start);
}

export class EventStream {
  constructor(api, { onEvent, onState, since = 0 }) {
    this.api = api;
    this.onEvent = onEvent;
    this.onState = onState || (() => {});
    this.lastId = since;
    this.stopped = false;
    this.ctl = null;
  }

  start() {
    this._loop();
    return this;
  }

  stop() {
    this.stopped = true;
    if (this.ctl) this.ctl.abort();
  }

  async _loop() {
    let delay = 1000;
    while (!this.stopped) {
      try {
        await this._once();
        delay = 1000;
      } catch (e) {
        if (this.stopped) return;
        if (e.status === 401) {
          this.onState("unauthorized", "the token was refused");
          return;
        }
        this.onState("down", String(e.message || e));
      }
      if (this.stopped) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  async _once() {
    this.ctl = new AbortController();
    const resp = await fetch(`${this.api.base}/events?since=${encodeURIComponent(this.lastId)}`, {
      headers: { ...this.api.headers(), Accept: "text/event-stream" },
      signal: this.ctl.signal,
      cache: "no-store",
    });
    if (!resp.ok) {
      const err = new Error(`events: HTTP ${resp.status}`);
      err.status = resp.status;
      throw err;
    }
    this.onState("live", "");
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseFrames(buffer + decoder.decode(value, { stream: true }), (frame) => {
        if (frame.id !== null && /^\d+$/.test(frame.id)) this.lastId = Number(frame.id);
        let event;
        try {
          event = JSON.parse(frame.data.join("\n"));
        } catch {
          return;
        }
        this.onEvent(event);
      });
    }
    throw new Error("the event stream ended");
  }
}
