// The in-page verify view: every step from (server seed, client seed, nonce) to the roll,
// computed in this browser with WebCrypto. It never asks the server.

import { ACCEPT_BELOW, OUTCOMES, hasWebCrypto, verifyRoll } from "./rules.js";
import { el } from "./dom.js";

function step(title, ...body) {
  return el("div", { class: "step" }, el("b", {}, title), ...body);
}

/**
 * Recompute and show a roll. `expect` (optional): {roll, server_seed_hash} of a bet, to say
 * whether the server's answer matches. Returns the result, or null on bad input.
 */
export async function showVerification(out, serverSeed, clientSeed, nonceText, expect) {
  out.replaceChildren();
  if (!hasWebCrypto()) {
    out.append(step("Cannot verify here", "This browser offers no WebCrypto on this page (it needs https, localhost or a file opened from disk). Use the standalone verifier."));
    return null;
  }
  if (!serverSeed || !/^[0-9]{1,19}$/.test(nonceText)) {
    out.append(step("Missing input", "Give a server seed, a client seed and a nonce (a whole number)."));
    return null;
  }
  const r = await verifyRoll(serverSeed, clientSeed, nonceText);
  const table = el("table", { "data-testid": "v-windows" },
    el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "hex"), el("th", {}, "value"), el("th", {}, `< ${ACCEPT_BELOW}?`))));
  const tbody = el("tbody");
  for (const w of r.windows) {
    tbody.append(el("tr", { "data-window": w.hex },
      el("td", {}, String(w.index + 1)), el("td", { class: "mono" }, w.hex), el("td", {}, String(w.value)),
      el("td", { class: w.accepted ? "ok" : "bad" }, w.accepted ? "yes: use it" : "no: next window")));
  }
  table.append(tbody);
  const last = r.windows[r.windows.length - 1];
  out.append(
    step("1. Message", el("code", { "data-testid": "v-message" }, r.message)),
    step("2. HMAC-SHA256(key = server seed, message)", el("code", { "data-testid": "v-hmac", class: "mono" }, r.hmac)),
    step("3. 5-character windows", table),
    step("4. Roll", el("span", {}, `${last.value} mod ${OUTCOMES} = ${r.roll}, / 100 = `),
      el("span", { class: "big", "data-testid": "v-roll" }, r.rollText)),
    step("5. SHA-256(server seed), the commitment shown before betting", el("code", { "data-testid": "v-hash", class: "mono" }, r.serverSeedHash)),
  );
  if (expect) {
    const parts = [];
    if (expect.roll !== undefined) {
      const same = expect.roll === r.rollText;
      parts.push(el("div", { class: same ? "ok" : "bad", "data-testid": "v-match" },
        same ? `✓ matches the server's roll ${expect.roll}` : `✗ the server said ${expect.roll}, the browser computes ${r.rollText}`));
    }
    if (expect.server_seed_hash) {
      const same = expect.server_seed_hash === r.serverSeedHash;
      parts.push(el("div", { class: same ? "ok" : "bad", "data-testid": "v-hash-match" },
        same ? "✓ the seed hashes to the commitment made before the bet" : "✗ the seed does not hash to the commitment"));
    }
    out.append(step("6. Compared with the bet", ...parts));
  }
  return r;
}
