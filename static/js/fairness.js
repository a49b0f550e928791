// Fairness: the active seed pair, the rotation that reveals it, and the revealed pairs.

import * as R from "./rules.js";
import { $, el } from "./dom.js";
import { newId } from "./socket.js";
import { state, save } from "./state.js";
import { toast, errorText } from "./notice.js";
import { openProof, runVerify, selectTab } from "./mybets.js";

function randomClientSeed() {
  return newId().slice(0, 16);
}

export function renderSeed() {
  $("seed-hash").textContent = state.seed.server_seed_hash || "—";
  $("seed-nonce").textContent = String(state.seed.nonce);
  if (document.activeElement !== $("client-seed")) $("client-seed").value = state.seed.client_seed;
}

export function renderRevealed() {
  const list = $("revealed");
  list.replaceChildren();
  for (const pair of state.revealed) {
    const li = el("li", { "data-hash": pair.server_seed_hash });
    const row = (k, v, cls) => el("div", { class: "row" },
      el("span", { class: "k" }, k), el("span", { class: cls ? `mono ${cls}` : "mono" }, v));
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
      const btn = el("button", { type: "button", class: "btn btn-small" }, `Verify nonce ${pair.nonce}`);
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

export async function rotate() {
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

export function wireFairness() {
  $("rotate").addEventListener("click", rotate);
  $("client-random").addEventListener("click", () => { $("client-seed").value = randomClientSeed(); });
}
