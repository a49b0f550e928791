// The session: demo sign-in, the player socket and what its events change, sign-out.

import { $ } from "./dom.js";
import { PlaySocket } from "./socket.js";
import { TOKEN_KEY, state, load } from "./state.js";
import { toast, errorText } from "./notice.js";
import { setBalance, renderCurrencies } from "./wallet.js";
import { updateBetPanel } from "./betpanel.js";
import { renderHistory } from "./mybets.js";
import { renderRevealed, renderSeed } from "./fairness.js";

function showSignedIn(on) {
  $("wallet").hidden = !on;
  $("signin").hidden = on;
  $("signout").hidden = !on;
}

function setConn(state_, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = `pill ${state_ === "live" ? "pill-live" : state_ === "off" ? "pill-off" : "pill-warn"}`;
}

export function connect() {
  const sock = new PlaySocket(state.token);
  state.sock = sock;
  sock.addEventListener("welcome", (e) => {
    const w = e.detail;
    if (state.userId !== w.user_id) {
      state.userId = w.user_id;
      state.history = load("bets");
      state.revealed = load("revealed");
      renderHistory();
      renderRevealed();
    }
    for (const [cur, text] of Object.entries(w.balances)) setBalance(cur, text);
    renderCurrencies();
    state.seed = { ...w.seed };
    renderSeed();
    showSignedIn(true);
    if ($("result-text").textContent.startsWith("Sign in")) $("result-text").textContent = "Pick a target and roll";
    updateBetPanel();
  });
  sock.addEventListener("balance", (e) => setBalance(e.detail.currency, e.detail.balance));
  sock.addEventListener("status", (e) => {
    const d = e.detail;
    if (d.state === "live") setConn("live", "live");
    else if (d.state === "connecting") setConn("warn", "connecting…");
    else setConn("warn", `reconnecting in ${Math.ceil(d.delay / 1000)} s${d.pending ? `, ${d.pending} bet(s) waiting` : ""}`);
  });
  sock.addEventListener("unauthorized", () => { toast("Your session ended: sign in again."); signOut(); });
  sock.addEventListener("error-frame", (e) => toast(errorText(e.detail)));
  sock.connect();
}

export async function signIn() {
  const btn = $("signin");
  btn.disabled = true;
  try {
    const r = await fetch("api/demo", { method: "POST" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) { toast(body.message || `Demo sign-in failed (${r.status})`); return; }
    state.token = body.token;
    localStorage.setItem(TOKEN_KEY, body.token);
    connect();
  } catch {
    toast("Cannot reach the server; try again.");
  } finally {
    btn.disabled = false;
  }
}

export function signOut() {
  if (state.auto) state.auto.stop = true;
  if (state.sock) state.sock.close();
  state.sock = null;
  state.token = null;
  state.userId = null;
  state.balances.clear();
  localStorage.removeItem(TOKEN_KEY);
  showSignedIn(false);
  setConn("off", "offline");
  state.history = [];
  state.revealed = [];
  renderHistory();
  renderRevealed();
  state.seed = { server_seed_hash: "", client_seed: "", nonce: 0 };
  renderSeed();
}
