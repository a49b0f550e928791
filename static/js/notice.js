// Messages to the player: the toast, and the words for each protocol error code.

import { $ } from "./dom.js";

let toastTimer = null;
export function toast(text, kind = "error") {
  const t = $("toast");
  t.textContent = text;
  t.className = `toast ${kind === "info" ? "info" : ""}`;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

export function errorText(err) {
  const known = {
    INSUFFICIENT_FUNDS: "Not enough balance for this bet.",
    BET_LIMIT: "The bet is outside the limits (minimum, maximum bet or maximum profit).",
    INVALID_AMOUNT: "That amount is not valid for this currency.",
    INVALID_TARGET: "That target is not allowed (win chance 0.01 % to 98 %).",
    RATE_LIMITED: "Too fast: slow down a little.",
    UNAVAILABLE: "The server is busy; nothing was changed. Try again.",
    INVALID_SEED: "A client seed is 1 to 64 characters of A-Z a-z 0-9 - _ .",
  };
  return known[err.code] || `${err.code || "Error"}: ${err.message}`;
}
