// StakePro page: sign-in, wallet, bet panel, autobet, my bets, fairness and verify.

import * as R from "./rules.js";
import { PlaySocket, newId } from "./socket.js";
import { AutobetRun, makePlan } from "./autobet.js";
import { startFeed, timeText } from "./feed.js";
import { showVerification } from "./verifyview.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "stakepro.token";
const CUR_KEY = "stakepro.currency";
const MAX_HISTORY = 100;

const state = {
  token: localStorage.getItem(TOKEN_KEY),
  userId: null,
  balances: new Map(),     // currency -> BigInt minor units
  decimals: new Map(),     // currency -> decimals
  limits: new Map(),       // currency -> {min, max, maxProfit} in BigInt minor units (GET /api/limits)
  currency: localStorage.getItem(CUR_KEY) || "USDT",
  seed: { server_seed_hash: "", client_seed: "", nonce: 0 },
  direction: "under",
  target: 5000,            // hundredths
  history: [],             // bet records, newest first
  revealed: [],            // revealed pairs, newest first
  sock: null,
  inFlight: false,
  auto: null,              // {run, stop: bool}
  mode: "manual",
  lastRoll: 5000,
};

// ---- small helpers -----------------------------------------------------------------------

const dec = () => state.decimals.get(state.currency) ?? 2;
const fmt = (minor, d = dec()) => R.formatAmount(minor, d);
const storeKey = (what) => `stakepro.${state.userId}.${what}`;

let toastTimer = null;
function toast(text, kind = "error") {
  const t = $("toast");
  t.textContent = text;
  t.className = `toast ${kind === "info" ? "info" : ""}`;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

function errorText(err) {
  const known = {
    INSUFFICIENT_FUNDS: "Not enough balance for this bet.",
    BET_LIMIT: "The bet is outside the limits (minimum, maximum bet or maximum profit).",
    INVALID_AMOUNT: "That amount is not valid for this currency.",
    INVALID_TARGET: "That target is not allowed (win chance 0.01 % to 98 %).",
    RATE_LIMITED: "Too fast: slow down a little.",
    UNAVAILABLE: "The server is busy; nothing was changed. Try again.",
    INVALID_SEED: "A client seed is 1 to 64 characters of A-Z a-z 0-9 - _ .",
  };
  return known[err.code] || `${err.code || "Error"}: ${err.message}`;
}

function save() {
  if (state.userId === null) return;
  try {
    localStorage.setItem(storeKey("bets"), JSON.stringify(state.history.slice(0, MAX_HISTORY)));
    localStorage.setItem(storeKey("revealed"), JSON.stringify(state.revealed.slice(0, 50)));
  } catch { /* storage full: the page works on without it */ }
}

function load(what) {
  try { return JSON.parse(localStorage.getItem(storeKey(what)) || "[]"); } catch { return []; }
}

// ---- wallet ------------------------------------------------------------------------------

function renderBalance(direction) {
  const out = $("balance");
  const bal = state.balances.get(state.currency);
  out.textContent = bal === undefined ? "—" : `${fmt(bal)}`;
  out.title = `${state.currency} balance`;
  if (direction) {
    out.classList.remove("flash-up", "flash-down");
    void out.offsetWidth;
    out.classList.add(direction > 0 ? "flash-up" : "flash-down");
  }
  $("amount-cur").textContent = state.currency;
}

function setBalance(currency, text) {
  const d = R.decimalsOf(text);
  const minor = R.parseAmount(text, d);
  if (minor === null) return;
  const before = state.balances.get(currency);
  state.decimals.set(currency, d);
  state.balances.set(currency, minor);
  if (currency === state.currency) renderBalance(before === undefined ? 0 : (minor > before ? 1 : minor < before ? -1 : 0));
}

function renderCurrencies() {
  const sel = $("currency");
  const high = $("high-currency");
  const names = [...state.balances.keys()];
  if (!names.includes(state.currency)) state.currency = names[0];
  sel.replaceChildren(...names.map((c) => new Option(c, c, false, c === state.currency)));
  const highValue = high.value;
  high.replaceChildren(...names.map((c) => new Option(c, c, false, c === highValue)));
  renderBalance();
}

function switchCurrency(currency) {
  state.currency = currency;
  localStorage.setItem(CUR_KEY, currency);
  const bal = state.balances.get(currency) ?? 0n;
  let amount = bal / 1000n;
  if (amount < 1n) amount = 1n;
  $("amount").value = fmt(amount);
  renderBalance();
  updateBetPanel();
}

// ---- bet panel: amount, target, direction, chance, multiplier, profit ----------------------

function amountMinor() {
  return R.parseAmount($("amount").value, dec());
}

function winning() {
  return R.winningOutcomes(state.target, state.direction);
}

/** Keep every bet field consistent; `from` names the field being typed in (left alone). */
function updateBetPanel(from) {
  const w = winning();
  const valid = R.validWinning(w);
  const [lo, hi] = R.targetRange(state.direction);
  const range = $("target-range");
  if (from !== "range") range.value = String(state.target);
  if (from !== "target") $("target").value = R.formatHundredths(state.target);
  $("target-label").textContent = state.direction === "under" ? "Roll under" : "Roll over";
  const mult = valid ? R.multiplierBp(w) : null;
  if (from !== "multiplier") $("multiplier").value = mult === null ? "—" : R.formatMultiplier(mult);
  if (from !== "chance") $("chance").value = valid ? R.formatChance(w) : "—";
  for (const id of ["target", "multiplier", "chance"]) $(id).classList.toggle("invalid", !valid);
  const pct = state.target / 100;
  $("track").style.background = state.direction === "under"
    ? `linear-gradient(90deg, var(--green) ${pct}%, var(--red) ${pct}%)`
    : `linear-gradient(90deg, var(--red) ${pct}%, var(--green) ${pct}%)`;
  const amount = amountMinor();
  $("profit").value = amount !== null && mult !== null ? fmt(R.payout(amount, mult) - amount) : "—";
  const lim = state.limits.get(state.currency);
  $("amount-limits").textContent = lim
    ? `Min ${fmt(lim.min)} · max ${fmt(lim.max)} · max profit ${fmt(lim.maxProfit)} ${state.currency}`
    : "";
  let problem = "";
  if (amount === null) problem = `Amount: a number with at most ${dec()} decimals.`;
  else if (!valid) problem = `Target: ${R.formatHundredths(lo)} to ${R.formatHundredths(hi)} when rolling ${state.direction}.`;
  else if (lim && amount < lim.min) problem = `Amount: at least ${fmt(lim.min)} ${state.currency}.`;
  else if (lim && amount > lim.max) problem = `Amount: at most ${fmt(lim.max)} ${state.currency} a bet.`;
  else if (lim && mult !== null && R.payout(amount, mult) - amount > lim.maxProfit) {
    problem = `Profit on win: at most ${fmt(lim.maxProfit)} ${state.currency}; lower the amount or the multiplier.`;
  }
  $("amount").classList.toggle("invalid", problem.startsWith("Amount"));
  $("bet-error").textContent = problem;
  return !problem;
}

function setTarget(h, from) {
  const [lo, hi] = R.targetRange(state.direction);
  state.target = Math.min(hi, Math.max(lo, h));
  updateBetPanel(from);
}

function setDirection(direction) {
  if (direction === state.direction) return;
  // under T and over 100 - T share the winning outcomes: the chance and multiplier stay.
  state.direction = direction;
  state.target = 10000 - state.target;
  updateBetPanel();
}

function scaleAmount(kind) {
  const bal = state.balances.get(state.currency) ?? 0n;
  let a = amountMinor() ?? 0n;
  if (kind === "half") a = a / 2n;
  if (kind === "double") a = a === 0n ? 1n : a * 2n;
  if (kind === "max") a = bal;
  if (kind !== "half" && a > bal) a = bal;
  const lim = state.limits.get(state.currency);
  if (lim && kind !== "half" && a > lim.max) a = lim.max;
  if (a < 1n && bal > 0n) a = 1n;
  $("amount").value = fmt(a);
  updateBetPanel();
}

function wireBetPanel() {
  $("amount").addEventListener("input", () => updateBetPanel("amount"));
  $("amount").addEventListener("blur", () => { const a = amountMinor(); if (a !== null) $("amount").value = fmt(a); updateBetPanel(); });
  $("half").addEventListener("click", () => scaleAmount("half"));
  $("double").addEventListener("click", () => scaleAmount("double"));
  $("max").addEventListener("click", () => scaleAmount("max"));
  $("target-range").addEventListener("input", (e) => {
    const [lo, hi] = R.targetRange(state.direction);
    const v = Math.min(hi, Math.max(lo, Number(e.target.value)));
    if (String(v) !== e.target.value) e.target.value = String(v);
    setTarget(v, "range");
  });
  $("target").addEventListener("input", (e) => {
    const h = R.parseTarget(e.target.value);
    if (h === null) { e.target.classList.add("invalid"); return; }
    state.target = h;
    updateBetPanel("target");
  });
  $("chance").addEventListener("input", (e) => {
    const w = R.parseTarget(e.target.value);   // a chance has the shape of a target: 2 decimals
    if (w === null || !R.validWinning(w)) { e.target.classList.add("invalid"); return; }
    state.target = R.targetFor(w, state.direction);
    updateBetPanel("chance");
  });
  $("multiplier").addEventListener("input", (e) => {
    const bp = R.parseMultiplier(e.target.value);
    if (bp === null || bp < R.multiplierBp(R.MAX_WINNING) || bp > R.multiplierBp(1)) { e.target.classList.add("invalid"); return; }
    state.target = R.targetFor(R.winningForMultiplier(bp), state.direction);
    updateBetPanel("multiplier");
  });
  for (const id of ["target", "chance", "multiplier"]) $(id).addEventListener("blur", () => updateBetPanel());
  $("toggle-dir").addEventListener("click", () => setDirection(state.direction === "under" ? "over" : "under"));
  $("bet-form").addEventListener("submit", (e) => { e.preventDefault(); if (state.mode === "manual") manualRoll(); else toggleAutobet(); });
  for (const b of document.querySelectorAll(".seg-btn")) b.addEventListener("click", () => setMode(b.dataset.mode));
}

function setMode(mode) {
  if (state.auto) return;
  state.mode = mode;
  for (const b of document.querySelectorAll(".seg-btn")) {
    b.classList.toggle("active", b.dataset.mode === mode);
    b.setAttribute("aria-selected", String(b.dataset.mode === mode));
  }
  $("auto-fields").hidden = mode !== "auto";
  $("roll").hidden = mode !== "manual";
  $("auto-start").hidden = mode !== "auto";
}

// ---- result animation --------------------------------------------------------------------

let animFrame = 0;
function animateResult(bet, fast) {
  const roll = R.parseTarget(bet.roll) ?? 0;
  const from = state.lastRoll;
  state.lastRoll = roll;
  const box = $("result");
  const num = $("result-roll");
  const marker = $("marker");
  box.className = "result rolling";
  marker.className = `marker shown ${bet.win ? "win" : "loss"}`;
  marker.style.left = `${roll / 100}%`;
  $("marker-label").textContent = bet.roll;
  const duration = fast ? 120 : 380;
  const start = performance.now();
  cancelAnimationFrame(animFrame);
  const tick = (now) => {
    const t = Math.min(1, (now - start) / duration);
    const eased = 1 - (1 - t) ** 3;
    num.textContent = R.formatHundredths(Math.round(from + (roll - from) * eased));
    if (t < 1) { animFrame = requestAnimationFrame(tick); return; }
    num.textContent = bet.roll;
    box.className = `result ${bet.win ? "win" : "loss"}`;
  };
  animFrame = requestAnimationFrame(tick);
  const cur = bet.currency;
  $("result-text").textContent = bet.win
    ? `You won ${bet.payout} ${cur} (${bet.multiplier}×)`
    : `You lost ${bet.amount} ${cur}: rolled ${bet.roll}, needed ${bet.direction} ${bet.target}`;
  box.dataset.outcome = bet.win ? "win" : "loss";
  box.dataset.nonce = String(bet.nonce);
  const li = document.createElement("li");
  li.className = bet.win ? "win" : "loss";
  li.textContent = bet.roll;
  const recent = $("recent");
  recent.append(li);
  while (recent.children.length > 6) recent.firstElementChild.remove();
}

// ---- betting -----------------------------------------------------------------------------

async function placeBet(amount, fast = false) {
  if (!state.sock) throw Object.assign(new Error("Sign in first (Play demo)."), { code: "SIGNED_OUT" });
  const w = winning();
  if (!R.validWinning(w)) throw Object.assign(new Error("target out of range"), { code: "INVALID_TARGET" });
  const message = {
    type: "bet", id: newId(), currency: state.currency, amount: fmt(amount),
    target: R.formatHundredths(state.target), direction: state.direction,
  };
  const reply = await state.sock.request(message);
  const bet = {
    id: message.id, bet_id: reply.bet_id, ts: Date.now(), currency: message.currency,
    amount: message.amount, target: message.target, direction: message.direction,
    roll: reply.roll, win: reply.win, multiplier: reply.multiplier, payout: reply.payout,
    nonce: reply.nonce, server_seed_hash: reply.server_seed_hash, client_seed: reply.client_seed,
  };
  setBalance(bet.currency, reply.balance);
  state.seed.nonce = reply.nonce;
  $("seed-nonce").textContent = String(reply.nonce);
  state.history.unshift(bet);
  state.history.length = Math.min(state.history.length, MAX_HISTORY);
  addHistoryRow(bet, true);
  save();
  animateResult(bet, fast);
  return bet;
}

async function manualRoll() {
  if (state.inFlight || state.auto) return;
  if (!state.sock) { toast("Sign in first: press Play demo."); return; }
  if (!updateBetPanel()) return;
  state.inFlight = true;
  $("roll").disabled = true;
  $("roll").textContent = "Rolling…";
  try {
    await placeBet(amountMinor());
  } catch (err) {
    toast(errorText(err));
  } finally {
    state.inFlight = false;
    $("roll").disabled = false;
    $("roll").textContent = "Roll dice";
  }
}

// ---- autobet -----------------------------------------------------------------------------

function autoFields() {
  const choice = (k) => document.querySelector(`.choice.active[data-for="${k}"]`).dataset.value;
  return {
    bets: $("ab-bets").value, onWin: choice("win"), winPct: $("ab-win-pct").value,
    onLoss: choice("loss"), lossPct: $("ab-loss-pct").value, stopProfit: $("ab-stop-profit").value,
    stopLoss: $("ab-stop-loss").value, maxBet: $("ab-max-bet").value,
  };
}

function autoStatus(text, kind) {
  const s = $("auto-status");
  s.textContent = text;
  s.dataset.state = kind;
}

async function toggleAutobet() {
  if (state.auto) { state.auto.stop = true; return; }
  if (state.inFlight) return;
  if (!state.sock) { toast("Sign in first: press Play demo."); return; }
  if (!updateBetPanel()) return;
  const plan = makePlan(autoFields(), amountMinor(), dec());
  if (plan.error) { autoStatus(plan.error, "error"); return; }
  const run = new AutobetRun(plan);
  const auto = { run, stop: false };
  state.auto = auto;
  const btn = $("auto-start");
  btn.textContent = "Stop autobet";
  btn.classList.remove("btn-primary");
  btn.classList.add("btn-secondary");
  for (const b of document.querySelectorAll(".seg-btn")) b.disabled = true;
  let reason = "";
  try {
    for (;;) {
      if (auto.stop) { reason = `stopped by you after ${run.count} bets`; break; }
      const next = run.next();
      if (next.stop) { reason = next.stop; break; }
      const bal = state.balances.get(state.currency) ?? 0n;
      if (next.amount > bal) { reason = `balance ${fmt(bal)} is below the next bet ${fmt(next.amount)}`; break; }
      $("amount").value = fmt(next.amount);
      updateBetPanel();
      let bet;
      try {
        bet = await placeBet(next.amount, true);
      } catch (err) {
        reason = `the server refused a bet: ${errorText(err)}`;
        break;
      }
      run.record({ win: bet.win, amount: next.amount, payout: R.parseAmount(bet.payout, dec()) ?? 0n });
      const sign = run.profit >= 0n ? "+" : "−";
      const abs = run.profit >= 0n ? run.profit : -run.profit;
      autoStatus(`Running: ${run.count}${plan.bets ? ` of ${plan.bets}` : ""} bets, ${run.wins} won, profit ${sign}${fmt(abs)}`, "running");
      await new Promise((r) => setTimeout(r, 60));
    }
  } finally {
    state.auto = null;
    btn.textContent = "Start autobet";
    btn.classList.add("btn-primary");
    btn.classList.remove("btn-secondary");
    for (const b of document.querySelectorAll(".seg-btn")) b.disabled = false;
    $("amount").value = fmt(plan.base);
    updateBetPanel();
  }
  const sign = run.profit >= 0n ? "+" : "−";
  const abs = run.profit >= 0n ? run.profit : -run.profit;
  autoStatus(`Stopped: ${reason}. ${run.count} bets, ${run.wins} won, profit ${sign}${fmt(abs)}.`, "stopped");
}

function wireAutobet() {
  $("auto-start").addEventListener("click", toggleAutobet);
  for (const b of document.querySelectorAll(".choice")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll(`.choice[data-for="${b.dataset.for}"]`)) o.classList.toggle("active", o === b);
    });
  }
}

// ---- my bets and proofs ------------------------------------------------------------------

function addHistoryRow(bet, atTop) {
  const tbody = document.querySelector("#mybets tbody");
  const tr = document.createElement("tr");
  tr.tabIndex = 0;
  tr.dataset.nonce = String(bet.nonce);
  tr.dataset.betId = String(bet.bet_id);
  tr.title = "Open the proof of this bet";
  const cells = [
    timeText(bet.ts), `${bet.amount} ${bet.currency}`, `${bet.direction === "over" ? ">" : "<"} ${bet.target}`,
    bet.roll, `${bet.multiplier}×`, `${bet.payout} ${bet.currency}`, String(bet.nonce),
  ];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (i === 3 || i === 5) td.className = bet.win ? "win" : "loss";
    tr.append(td);
  });
  const open = () => openProof(bet);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); e.stopPropagation(); open(); } });
  if (atTop) tbody.prepend(tr); else tbody.append(tr);
  while (tbody.rows.length > MAX_HISTORY) tbody.deleteRow(tbody.rows.length - 1);
  $("mybets-empty").hidden = true;
}

function renderHistory() {
  document.querySelector("#mybets tbody").replaceChildren();
  for (const bet of state.history) addHistoryRow(bet, false);
  $("mybets-empty").hidden = state.history.length > 0;
}

function selectTab(name) {
  const btn = document.querySelector(`.tab[data-tab="${name}"]`);
  const bar = btn.parentElement;
  for (const t of bar.querySelectorAll(".tab")) {
    const on = t === btn;
    t.classList.toggle("active", on);
    t.setAttribute("aria-selected", String(on));
    $(`panel-${t.dataset.tab}`).hidden = !on;
  }
}

function proofLine(label, value) {
  const div = document.createElement("div");
  const b = document.createElement("span");
  b.className = "muted";
  b.textContent = `${label}: `;
  const v = document.createElement("span");
  v.className = "mono";
  v.textContent = value;
  div.append(b, v);
  return div;
}

async function openProof(bet) {
  selectTab("verify");
  const box = $("proof-bet");
  box.hidden = false;
  box.replaceChildren(
    proofLine("Bet", `${bet.amount} ${bet.currency}, roll ${bet.direction} ${bet.target}, rolled ${bet.roll}, paid ${bet.payout}`),
    proofLine("Server seed hash (committed)", bet.server_seed_hash),
    proofLine("Client seed", bet.client_seed),
    proofLine("Nonce", String(bet.nonce)),
  );
  let pair = state.revealed.find((p) => p.server_seed_hash === bet.server_seed_hash);
  if (!pair && bet.server_seed_hash !== state.seed.server_seed_hash && bet.bet_id !== undefined) {
    // Revealed somewhere else (another tab): the stored bet carries its seed once revealed.
    try {
      const r = await fetch(`api/bets/${encodeURIComponent(bet.bet_id)}`);
      if (r.ok) {
        const stored = await r.json();
        if (stored.server_seed) pair = { server_seed: stored.server_seed, server_seed_hash: bet.server_seed_hash };
      }
    } catch { /* offline: fall through */ }
  }
  $("v-client-seed").value = bet.client_seed;
  $("v-nonce").value = String(bet.nonce);
  if (!pair) {
    $("v-server-seed").value = "";
    const note = document.createElement("p");
    note.className = "muted";
    note.dataset.testid = "proof-secret";
    note.textContent = "This bet's server seed is still secret (it is the active one). Rotate the seed pair in the Fairness tab to reveal it, then open the bet again.";
    const rot = document.createElement("button");
    rot.type = "button";
    rot.className = "btn btn-small";
    rot.textContent = "Rotate now";
    rot.addEventListener("click", async () => { if (await rotate()) openProof(bet); });
    box.append(note, rot);
    $("v-out").replaceChildren();
    return;
  }
  $("v-server-seed").value = pair.server_seed;
  state.verifyExpect = { roll: bet.roll, server_seed_hash: bet.server_seed_hash };
  await runVerify();
}

async function runVerify() {
  const expect = state.verifyExpect;
  const link = $("verify-standalone");
  const q = new URLSearchParams({ server_seed: $("v-server-seed").value.trim(), client_seed: $("v-client-seed").value, nonce: $("v-nonce").value.trim() });
  if (expect && expect.server_seed_hash) q.set("server_seed_hash", expect.server_seed_hash);
  link.href = `verify.html#${q}`;
  await showVerification($("v-out"), $("v-server-seed").value.trim(), $("v-client-seed").value, $("v-nonce").value.trim(), expect);
}

function wireVerify() {
  $("verify-form").addEventListener("submit", (e) => { e.preventDefault(); runVerify(); });
  for (const id of ["v-server-seed", "v-client-seed", "v-nonce"]) {
    $(id).addEventListener("input", () => { state.verifyExpect = null; $("proof-bet").hidden = true; });
  }
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => selectTab(t.dataset.tab));
}

// ---- fairness ----------------------------------------------------------------------------

function randomClientSeed() {
  return newId().slice(0, 16);
}

function renderSeed() {
  $("seed-hash").textContent = state.seed.server_seed_hash || "—";
  $("seed-nonce").textContent = String(state.seed.nonce);
  if (document.activeElement !== $("client-seed")) $("client-seed").value = state.seed.client_seed;
}

function renderRevealed() {
  const list = $("revealed");
  list.replaceChildren();
  for (const pair of state.revealed) {
    const li = document.createElement("li");
    li.dataset.hash = pair.server_seed_hash;
    const row = (k, v, cls) => {
      const d = document.createElement("div");
      d.className = "row";
      const a = document.createElement("span"); a.className = "k"; a.textContent = k;
      const b = document.createElement("span"); b.className = `mono ${cls || ""}`; b.textContent = v;
      d.append(a, b);
      return d;
    };
    const check = row("Hash check", "checking…");
    li.append(
      row("Server seed", pair.server_seed, "revealed-seed"),
      row("SHA-256", pair.server_seed_hash),
      row("Client seed", pair.client_seed),
      row("Last nonce", String(pair.nonce)),
      check,
    );
    if (R.hasWebCrypto()) {
      R.sha256Hex(pair.server_seed).then((h) => {
        const ok = h === pair.server_seed_hash;
        check.lastChild.textContent = ok ? "✓ SHA-256(server seed) is the hash shown before the bets" : "✗ does not match the committed hash";
        check.lastChild.className = ok ? "ok" : "bad";
      });
    }
    if (pair.nonce > 0) {
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "btn btn-small";
      btn.textContent = `Verify nonce ${pair.nonce}`;
      btn.addEventListener("click", () => {
        const bet = state.history.find((b) => b.server_seed_hash === pair.server_seed_hash && b.nonce === pair.nonce);
        if (bet) { openProof(bet); return; }
        $("v-server-seed").value = pair.server_seed;
        $("v-client-seed").value = pair.client_seed;
        $("v-nonce").value = String(pair.nonce);
        state.verifyExpect = { server_seed_hash: pair.server_seed_hash };
        $("proof-bet").hidden = true;
        selectTab("verify");
        runVerify();
      });
      li.append(btn);
    }
    list.append(li);
  }
  $("revealed-empty").hidden = state.revealed.length > 0;
}

async function rotate() {
  if (!state.sock) { toast("Sign in first: press Play demo."); return false; }
  if (state.auto || state.inFlight) { toast("Wait for the running bets to finish."); return false; }
  const seed = $("client-seed").value.trim() || randomClientSeed();
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(seed)) { toast(errorText({ code: "INVALID_SEED" })); return false; }
  $("rotate").disabled = true;
  try {
    const reply = await state.sock.request({ type: "rotate_seed", id: newId(), client_seed: seed });
    state.revealed.unshift(reply.revealed);
    state.seed = { ...reply.current };
    save();
    renderSeed();
    renderRevealed();
    toast("Seed pair rotated: the old server seed is revealed below.", "info");
    return true;
  } catch (err) {
    toast(errorText(err));
    return false;
  } finally {
    $("rotate").disabled = false;
  }
}

function wireFairness() {
  $("rotate").addEventListener("click", rotate);
  $("client-random").addEventListener("click", () => { $("client-seed").value = randomClientSeed(); });
}

// ---- session -----------------------------------------------------------------------------

function setConn(state_, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = `pill ${state_ === "live" ? "pill-live" : state_ === "off" ? "pill-off" : "pill-warn"}`;
}

function connect() {
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
    $("wallet").hidden = false;
    $("signin").hidden = true;
    $("signout").hidden = false;
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

async function signIn() {
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

function signOut() {
  if (state.auto) state.auto.stop = true;
  if (state.sock) state.sock.close();
  state.sock = null;
  state.token = null;
  state.userId = null;
  state.balances.clear();
  localStorage.removeItem(TOKEN_KEY);
  $("wallet").hidden = true;
  $("signin").hidden = false;
  $("signout").hidden = true;
  setConn("off", "offline");
  state.history = [];
  state.revealed = [];
  renderHistory();
  renderRevealed();
  state.seed = { server_seed_hash: "", client_seed: "", nonce: 0 };
  renderSeed();
}

// ---- keyboard ----------------------------------------------------------------------------

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  const tag = t && t.tagName;
  const typing = (tag === "INPUT" && t.type !== "range") || tag === "TEXTAREA" || tag === "SELECT" || (t && t.isContentEditable);
  if (typing) return;
  const onControl = tag === "BUTTON" || tag === "A" || tag === "TR";
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  const actions = {
    " ": () => (state.mode === "manual" ? manualRoll() : toggleAutobet()),
    Enter: () => (state.mode === "manual" ? manualRoll() : toggleAutobet()),
    h: () => scaleAmount("half"),
    d: () => scaleAmount("double"),
    m: () => scaleAmount("max"),
    u: () => setDirection("under"),
    o: () => setDirection("over"),
    "[": () => setTarget(state.target - 100),
    "]": () => setTarget(state.target + 100),
    a: () => { if (!state.auto) setMode("auto"); toggleAutobet(); },
    v: () => { if (state.history[0]) openProof(state.history[0]); },
  };
  if ((key === " " || key === "Enter") && onControl) return;   // let the focused control act
  const act = actions[key];
  if (!act) return;
  e.preventDefault();
  act();
}

// ---- start -------------------------------------------------------------------------------

/** The per-bet limits of every currency (public, no sign-in): shown under the amount and
 *  checked before a bet is sent. Without them the server's BET_LIMIT still says no. */
async function loadLimits() {
  try {
    const r = await fetch("/api/limits");
    if (!r.ok) return;
    const body = await r.json();
    for (const [code, c] of Object.entries(body.currencies)) {
      state.limits.set(code, {
        min: R.parseAmount(c.min_bet, c.decimals),
        max: R.parseAmount(c.max_bet, c.decimals),
        maxProfit: R.parseAmount(c.max_profit, c.decimals),
      });
      if (!state.decimals.has(code)) state.decimals.set(code, c.decimals);
    }
    updateBetPanel();
  } catch {
    // offline or an older server: the server's checks remain
  }
}

function main() {
  wireBetPanel();
  wireAutobet();
  wireVerify();
  wireFairness();
  $("signin").addEventListener("click", signIn);
  $("signout").addEventListener("click", signOut);
  $("currency").addEventListener("change", (e) => switchCurrency(e.target.value));
  document.addEventListener("keydown", onKey);
  updateBetPanel();
  loadLimits();
  startFeed();
  if (state.token) connect();
  // For tests and the curious: the page's state and socket.
  window.stakepro = { state, placeBet, rotate, openProof };
}

main();
