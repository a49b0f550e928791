// The live feed panel: every settled bet from /ws/feed, and the high rollers among them.

import { FeedSocket } from "./socket.js";
import { decimalsOf, parseAmount } from "./rules.js";

const MAX_ROWS = 40;

export function timeText(ms) {
  const d = new Date(Number(ms) || Date.now());
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

export function feedRow(bet) {
  const tr = document.createElement("tr");
  tr.dataset.betId = String(bet.bet_id);
  tr.dataset.player = String(bet.player);
  tr.append(
    cell(timeText(bet.ts)),
    cell(String(bet.player)),
    cell(`${bet.amount} ${bet.currency}`),
    cell(`${bet.direction === "over" ? ">" : "<"} ${bet.target}`),
    cell(String(bet.roll), bet.win ? "win" : "loss"),
    cell(`${bet.multiplier}×`),
    cell(`${bet.payout} ${bet.currency}`, bet.win ? "win" : "loss"),
  );
  return tr;
}

function prepend(tbody, row) {
  tbody.prepend(row);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
}

export function startFeed() {
  const all = document.querySelector("#feed tbody");
  const high = document.querySelector("#high tbody");
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
      prepend(all, feedRow(bet));
      if (isHigh(bet)) prepend(high, feedRow(bet));
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
