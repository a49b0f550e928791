// One bet as a row of a bets table (My bets, All bets, High rollers). The table's head says
// which columns it has (<th data-col>); each cell repeats its column's name in data-label,
// which the narrow layout shows beside the value when a row is laid out as a card.

import { el } from "./dom.js";

export function timeText(ms) {
  const d = new Date(Number(ms) || Date.now());
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

const CELLS = {
  time: (bet) => timeText(bet.ts),
  player: (bet) => String(bet.player),
  amount: (bet) => `${bet.amount} ${bet.currency}`,
  target: (bet) => `${bet.direction === "over" ? ">" : "<"} ${bet.target}`,
  roll: (bet) => String(bet.roll),
  multiplier: (bet) => `${bet.multiplier}×`,
  payout: (bet) => `${bet.payout} ${bet.currency}`,
  nonce: (bet) => String(bet.nonce),
};

/** The bet's columns coloured by the outcome. */
const OUTCOME_COLUMNS = new Set(["roll", "payout"]);

/** A row for `table`: one cell per column of its head. */
export function betRow(table, bet) {
  const tr = el("tr", { "data-bet-id": String(bet.bet_id) });
  for (const th of table.tHead.rows[0].cells) {
    const col = th.dataset.col;
    const attrs = { "data-col": col, "data-label": th.textContent };
    if (OUTCOME_COLUMNS.has(col)) attrs.class = bet.win ? "win" : "loss";
    tr.append(el("td", attrs, CELLS[col](bet)));
  }
  return tr;
}
