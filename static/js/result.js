// The result of a bet on the board: the rolling number, the marker and the recent rolls.

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { state } from "./state.js";

let animFrame = 0;
export function animateResult(bet, fast) {
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
