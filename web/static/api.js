// The dashboard's only way to the appliance: /api/v1 with the bearer token, JSON both ways.

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(token, base = "/api/v1") {
    this.token = token;
    this.base = base;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.token}`, Accept: "application/json", ...extra };
  }

  async call(method, path, body, timeoutMs = 30000) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), timeoutMs);
    let resp;
    try {
      resp = await fetch(this.base + path, {
        method,
        headers: this.headers(body === undefined ? {} : { "Content-Type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiError(0, "network", `cannot reach the appliance: ${e.message || e}`);
    } finally {
      clearTimeout(timer);
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!resp.ok) {
      throw new ApiError(resp.status, data?.error || "", data?.detail || `${method} ${path}: HTTP ${resp.status}`);
    }
    return data;
  }

  get(path) {
    return this.call("GET", path);
  }
}

// A path segment, escaped (a MAC, a UUID, a name).
export function seg(value) {
  return encodeURIComponent(String(value));
}
