// The bet panel: amount, target, direction, chance, multiplier and profit kept consistent
// with each other and with the currency's limits, and the manual / auto switch.

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { state, dec, fmt } from "./state.js";

export function amountMinor() {
  return R.parseAmount($("amount").value, dec());
}

export function winning() {
  return R.winningOutcomes(state.target, state.direction);
}

/** Keep every bet field consistent; `from` names the field being typed in (left alone). */
export function updateBetPanel(from) {
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

export function setTarget(h, from) {
  const [lo, hi] = R.targetRange(state.direction);
  state.target = Math.min(hi, Math.max(lo, h));
  updateBetPanel(from);
}

export function setDirection(direction) {
  if (direction === state.direction) return;
  // under T and over 100 - T share the winning outcomes: the chance and multiplier stay.
  state.direction = direction;
  state.target = 10000 - state.target;
  updateBetPanel();
}

export function scaleAmount(kind) {
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

/** Wire the panel's fields; `play` runs when the form is submitted (Roll or Start autobet). */
export function wireBetPanel(play) {
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
  $("bet-form").addEventListener("submit", (e) => { e.preventDefault(); play(); });
  for (const b of document.querySelectorAll(".seg-btn")) b.addEventListener("click", () => setMode(b.dataset.mode));
}

export function setMode(mode) {
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
