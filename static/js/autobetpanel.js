// The autobet form and its run: one bet after another on the strategy of autobet.js.

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { AutobetRun, makePlan } from "./autobet.js";
import { state, dec, fmt } from "./state.js";
import { toast, errorText } from "./notice.js";
import { amountMinor, updateBetPanel } from "./betpanel.js";
import { manualRoll, placeBet } from "./betting.js";

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

/** The Start / Stop button, and the mode switch locked while a run is on. */
function showRunning(on) {
  const btn = $("auto-start");
  btn.textContent = on ? "Stop autobet" : "Start autobet";
  btn.classList.toggle("btn-primary", !on);
  btn.classList.toggle("btn-secondary", on);
  for (const b of document.querySelectorAll(".seg-btn")) b.disabled = on;
}

/** The run's profit so far with its sign: "+0.25", "−1.10". */
function profitText(run) {
  return run.profit >= 0n ? `+${fmt(run.profit)}` : `−${fmt(-run.profit)}`;
}

export async function toggleAutobet() {
  if (state.auto) { state.auto.stop = true; return; }
  if (state.inFlight) return;
  if (!state.sock) { toast("Sign in first: press Play demo."); return; }
  if (!updateBetPanel()) return;
  const plan = makePlan(autoFields(), amountMinor(), dec());
  if (plan.error) { autoStatus(plan.error, "error"); return; }
  const run = new AutobetRun(plan);
  const auto = { run, stop: false };
  state.auto = auto;
  showRunning(true);
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
      autoStatus(`Running: ${run.count}${plan.bets ? ` of ${plan.bets}` : ""} bets, ${run.wins} won, profit ${profitText(run)}`, "running");
      await new Promise((r) => setTimeout(r, 60));
    }
  } finally {
    state.auto = null;
    showRunning(false);
    $("amount").value = fmt(plan.base);
    updateBetPanel();
  }
  autoStatus(`Stopped: ${reason}. ${run.count} bets, ${run.wins} won, profit ${profitText(run)}.`, "stopped");
}

export function wireAutobet() {
  $("auto-start").addEventListener("click", toggleAutobet);
  for (const b of document.querySelectorAll(".choice")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll(`.choice[data-for="${b.dataset.for}"]`)) o.classList.toggle("active", o === b);
    });
  }
}

/** The action of the current mode: one roll, or start / stop the autobet. */
export function play() {
  return state.mode === "manual" ? manualRoll() : toggleAutobet();
}
