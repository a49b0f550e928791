// The player socket (/ws/play) with JSON text frames: auth, requests matched to replies by id,
// reconnect with exponential backoff and jitter, and the resend of every unanswered request
// (a bet keeps its id, which is its idempotency key: the server answers a resent bet with the
// original result and never bets twice).

export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

export function newId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Delay before reconnect attempt n (0-based): 0.5 s doubling to 15 s, with +-25 % jitter. */
export function backoffMs(attempt) {
  const base = Math.min(15000, 500 * 2 ** attempt);
  return Math.round(base * (0.75 + Math.random() * 0.5));
}

export class PlaySocket extends EventTarget {
  constructor(token) {
    super();
    this.token = token;
    this.ws = null;
    this.ready = false;          // welcome received on the current socket
    this.closed = false;         // closed on purpose: no reconnect
    this.attempt = 0;
    this.timer = null;
    this.pending = new Map();    // id -> {message, resolve, reject}
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  connect() {
    this.closed = false;
    clearTimeout(this.timer);
    const ws = new WebSocket(wsUrl("/ws/play"));
    this.ws = ws;
    this.emit("status", { state: "connecting" });
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.token }));
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let msg;
      try { msg = JSON.parse(event.data); } catch { return; }
      this.onMessage(ws, msg);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ready = false;
      this.ws = null;
      if (this.closed) return;
      // Only a bet is safe to resend (its id is its idempotency key); any other request
      // that went out unanswered is reported lost rather than repeated.
      for (const [id, p] of this.pending) {
        if (p.sent && p.message.type !== "bet") {
          this.pending.delete(id);
          p.reject(Object.assign(new Error("connection lost before the answer"), { code: "CONNECTION_LOST" }));
        }
      }
      if (event.code === 1008 && this.unauthorized) {
        this.closed = true;
        this.failAll({ code: "UNAUTHORIZED", message: "signed out" });
        this.emit("unauthorized", {});
        return;
      }
      const delay = backoffMs(this.attempt++);
      this.emit("status", { state: "reconnecting", delay, pending: this.pending.size });
      this.timer = setTimeout(() => this.connect(), delay);
    };
    ws.onerror = () => {};   // onclose follows and reconnects
  }

  onMessage(ws, msg) {
    if (!this.ready) {
      if (msg.type === "welcome") {
        this.ready = true;
        this.attempt = 0;
        this.emit("welcome", msg);
        this.emit("status", { state: "live" });
        // Resend everything still unanswered, with the same ids.
        for (const [, p] of this.pending) { ws.send(JSON.stringify(p.message)); p.sent = true; }
      } else if (msg.type === "error" && msg.code === "UNAUTHORIZED") {
        this.unauthorized = true;
      }
      return;
    }
    if (msg.type === "balance") { this.emit("balance", msg); return; }
    const p = msg.id !== undefined && msg.id !== null ? this.pending.get(msg.id) : undefined;
    if (p) {
      this.pending.delete(msg.id);
      if (msg.type === "error") p.reject(Object.assign(new Error(msg.message), { code: msg.code }));
      else p.resolve(msg);
      return;
    }
    if (msg.type === "error") this.emit("error-frame", msg);
  }

  /** Send a request and wait for its reply (across reconnects). */
  request(message) {
    if (message.id === undefined) message.id = newId();
    return new Promise((resolve, reject) => {
      const p = { message, resolve, reject, sent: false };
      this.pending.set(message.id, p);
      if (this.ready && this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify(message));
        p.sent = true;
      }
    });
  }

  failAll(error) {
    for (const [, p] of this.pending) p.reject(Object.assign(new Error(error.message), { code: error.code }));
    this.pending.clear();
  }

  /** Drop the socket as a network failure would (reconnects); used by tests and "retry". */
  drop() {
    if (this.ws) this.ws.close(4000, "dropped");
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.failAll({ code: "CLOSED", message: "signed out" });
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
    this.ready = false;
  }
}

/** A JSON socket that reconnects by itself, for the spectator feed. */
export class FeedSocket extends EventTarget {
  constructor(path = "/ws/feed") {
    super();
    this.path = path;
    this.attempt = 0;
    this.ws = null;
    this.stopped = false;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  connect() {
    const ws = new WebSocket(wsUrl(this.path));
    this.ws = ws;
    ws.onopen = () => { this.attempt = 0; this.emit("status", { state: "live" }); };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let msg;
      try { msg = JSON.parse(event.data); } catch { return; }
      if (msg.type === "feed" && Array.isArray(msg.bets)) this.emit("bets", msg.bets);
    };
    ws.onclose = () => {
      if (this.ws !== ws || this.stopped) return;
      const delay = backoffMs(this.attempt++);
      this.emit("status", { state: "reconnecting", delay });
      setTimeout(() => this.connect(), delay);
    };
    ws.onerror = () => {};
  }
}
