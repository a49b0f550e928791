// The live feed panel: every settled bet from /ws/feed, and the high rollers among them.

import { FeedSocket } from "./socket.js";
import { decimalsOf, parseAmount } from "./rules.js";
import { betRow } from "./betrow.js";

const MAX_ROWS = 40;

/** The bet as the newest row of `table`, the oldest beyond MAX_ROWS dropped. */
function prepend(table, bet) {
  const row = betRow(table, bet);
  row.dataset.player = String(bet.player);
  const tbody = table.tBodies[0];
  tbody.prepend(row);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
}

export function startFeed() {
  const all = document.getElementById("feed");
  const high = document.getElementById("high");
  const status = document.getElementById("feed-status");
  const threshold = document.getElementById("high-threshold");
  const thresholdCur = document.getElementById("high-currency");

  const isHigh = (bet) => {
    if (bet.currency !== thresholdCur.value) return false;
    const d = decimalsOf(bet.amount);
    const min = parseAmount(threshold.value, d);
    const amt = parseAmount(bet.amount, d);
    return min !== null && amt !== null && amt >= min;
  };

  const socket = new FeedSocket();
  socket.addEventListener("bets", (e) => {
    for (const bet of e.detail) {
      prepend(all, bet);
      if (isHigh(bet)) prepend(high, bet);
    }
  });
  socket.addEventListener("status", (e) => {
    status.textContent = e.detail.state === "live" ? "● live" : `reconnecting in ${Math.ceil(e.detail.delay / 1000)} s…`;
    status.className = e.detail.state === "live" ? "ok" : "muted";
  });
  thresholdCur.addEventListener("change", () => {
    threshold.value = thresholdCur.value === "BTC" ? "0.001" : "100";
  });
  socket.connect();
  return socket;
}
