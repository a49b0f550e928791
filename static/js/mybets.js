// My bets and their proofs: the history table, and a bet's roll recomputed in the Verify tab.

import { $, el } from "./dom.js";
import { betRow } from "./betrow.js";
import { showVerification } from "./verifyview.js";
import { MAX_HISTORY, state } from "./state.js";

// The seed rotation (fairness.js, which opens proofs from here): handed in by wireVerify, so
// that this module does not import fairness.js back.
let rotate = async () => false;

export function addHistoryRow(bet, atTop) {
  const table = $("mybets");
  const tbody = table.tBodies[0];
  const tr = betRow(table, bet);
  tr.tabIndex = 0;
  tr.dataset.nonce = String(bet.nonce);
  tr.title = "Open the proof of this bet";
  const open = () => openProof(bet);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); e.stopPropagation(); open(); } });
  if (atTop) tbody.prepend(tr); else tbody.append(tr);
  while (tbody.rows.length > MAX_HISTORY) tbody.deleteRow(tbody.rows.length - 1);
  $("mybets-empty").hidden = true;
}

export function renderHistory() {
  document.querySelector("#mybets tbody").replaceChildren();
  for (const bet of state.history) addHistoryRow(bet, false);
  $("mybets-empty").hidden = state.history.length > 0;
}

export function selectTab(name) {
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
  return el("div", {}, el("span", { class: "muted" }, `${label}: `), el("span", { class: "mono" }, value));
}

export async function openProof(bet) {
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
    const note = el("p", { class: "muted", "data-testid": "proof-secret" },
      "This bet's server seed is still secret (it is the active one). Rotate the seed pair in the Fairness tab to reveal it, then open the bet again.");
    const rot = el("button", { type: "button", class: "btn btn-small" }, "Rotate now");
    rot.addEventListener("click", async () => { if (await rotate()) openProof(bet); });
    box.append(note, rot);
    $("v-out").replaceChildren();
    return;
  }
  $("v-server-seed").value = pair.server_seed;
  state.verifyExpect = { roll: bet.roll, server_seed_hash: bet.server_seed_hash };
  await runVerify();
}

export async function runVerify() {
  const expect = state.verifyExpect;
  const link = $("verify-standalone");
  const q = new URLSearchParams({ server_seed: $("v-server-seed").value.trim(), client_seed: $("v-client-seed").value, nonce: $("v-nonce").value.trim() });
  if (expect && expect.server_seed_hash) q.set("server_seed_hash", expect.server_seed_hash);
  link.href = `verify.html#${q}`;
  await showVerification($("v-out"), $("v-server-seed").value.trim(), $("v-client-seed").value, $("v-nonce").value.trim(), expect);
}

/** rotateSeed: rotates the pair and resolves to whether it did (fairness.js's rotate). */
export function wireVerify(rotateSeed) {
  rotate = rotateSeed;
  $("verify-form").addEventListener("submit", (e) => { e.preventDefault(); runVerify(); });
  for (const id of ["v-server-seed", "v-client-seed", "v-nonce"]) {
    $(id).addEventListener("input", () => { state.verifyExpect = null; $("proof-bet").hidden = true; });
  }
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => selectTab(t.dataset.tab));
}
