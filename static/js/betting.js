// One bet: sent on the player socket, then shown in the balance, the history and the board.

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { newId } from "./socket.js";
import { MAX_HISTORY, state, fmt, save } from "./state.js";
import { toast, errorText } from "./notice.js";
import { setBalance } from "./wallet.js";
import { amountMinor, updateBetPanel, winning } from "./betpanel.js";
import { animateResult } from "./result.js";
import { addHistoryRow } from "./mybets.js";

export async function placeBet(amount, fast = false) {
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

export async function manualRoll() {
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
