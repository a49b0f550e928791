// The two sockets of the page, both JSON text frames that reconnect with exponential backoff
// and jitter: the player socket (/ws/play) with auth, requests matched to replies by id, and
// the resend of every unanswered bet (a bet keeps its id, which is its idempotency key: the
// server answers a resent bet with the original result and never bets twice); and the feed.

import { toHex } from "./rules.js";

export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

export function newId() {
  return toHex(crypto.getRandomValues(new Uint8Array(12)));
}

/** Delay before reconnect attempt n (0-based): 0.5 s doubling to 15 s, with +-25 % jitter. */
export function backoffMs(attempt) {
  const base = Math.min(15000, 500 * 2 ** attempt);
  return Math.round(base * (0.75 + Math.random() * 0.5));
}

/** The JSON value of a text frame, or null for a binary or malformed one (ignored). */
function jsonFrame(event) {
  if (typeof event.data !== "string") return null;
  try { return JSON.parse(event.data); } catch { return null; }
}

/**
 * A WebSocket of JSON text frames on `path` that reconnects after a loss. A subclass opens it
 * in connect(), gets each frame in onMessage(ws, msg) and the loss of the current socket in
 * onClose(event), and calls retry() to connect again after the backoff delay.
 */
class JsonSocket extends EventTarget {
  constructor(path) {
    super();
    this.path = path;
    this.ws = null;
    this.closed = false;         // closed on purpose: no reconnect
    this.attempt = 0;
    this.timer = null;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  open() {
    this.closed = false;
    clearTimeout(this.timer);
    const ws = new WebSocket(wsUrl(this.path));
    this.ws = ws;
    ws.onmessage = (event) => {
      const msg = jsonFrame(event);
      if (msg !== null) this.onMessage(ws, msg);
    };
    ws.onclose = (event) => { if (this.ws === ws) this.onClose(event); };
    ws.onerror = () => {};   // onclose follows and reconnects
    return ws;
  }

  /** Connect again after the next backoff delay; `detail` goes with the status event. */
  retry(detail = {}) {
    const delay = backoffMs(this.attempt++);
    this.emit("status", { state: "reconnecting", delay, ...detail });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
  }
}

export class PlaySocket extends JsonSocket {
  constructor(token) {
    super("/ws/play");
    this.token = token;
    this.ready = false;          // welcome received on the current socket
    this.pending = new Map();    // id -> {message, resolve, reject}
  }

  connect() {
    const ws = this.open();
    this.emit("status", { state: "connecting" });
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.token }));
  }

  onClose(event) {
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
    this.retry({ pending: this.pending.size });
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
    this.failAll({ code: "CLOSED", message: "signed out" });
    super.close();
    this.ready = false;
  }
}

/** The spectator feed: a "bets" event for each feed frame. */
export class FeedSocket extends JsonSocket {
  constructor(path = "/ws/feed") {
    super(path);
  }

  connect() {
    const ws = this.open();
    ws.onopen = () => { this.attempt = 0; this.emit("status", { state: "live" }); };
  }

  onMessage(ws, msg) {
    if (msg.type === "feed" && Array.isArray(msg.bets)) this.emit("bets", msg.bets);
  }

  onClose() {
    if (!this.closed) this.retry();
  }
}
