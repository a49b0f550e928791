// StakePro page: the start. Each section of the page is a module of its own (docs/architecture.md).

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { startFeed } from "./feed.js";
import { state } from "./state.js";
import { switchCurrency } from "./wallet.js";
import { updateBetPanel, wireBetPanel } from "./betpanel.js";
import { placeBet } from "./betting.js";
import { play, wireAutobet } from "./autobetpanel.js";
import { openProof, wireVerify } from "./mybets.js";
import { rotate, wireFairness } from "./fairness.js";
import { signIn, signOut, connect } from "./session.js";
import { onKey } from "./keyboard.js";

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
    // offline, or no limits to show: the server's own checks remain
  }
}

function main() {
  wireBetPanel(play);
  wireAutobet();
  wireVerify(rotate);
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
