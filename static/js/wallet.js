// The wallet in the top bar: each currency's balance, and the currency switch.

import * as R from "./rules.js";
import { $ } from "./dom.js";
import { CUR_KEY, state, fmt } from "./state.js";
import { updateBetPanel } from "./betpanel.js";

export function renderBalance(direction) {
  const out = $("balance");
  const bal = state.balances.get(state.currency);
  out.textContent = bal === undefined ? "—" : `${fmt(bal)}`;
  out.title = `${state.currency} balance`;
  if (direction) {
    out.classList.remove("flash-up", "flash-down");
    void out.offsetWidth;
    out.classList.add(direction > 0 ? "flash-up" : "flash-down");
  }
  $("amount-cur").textContent = state.currency;
}

export function setBalance(currency, text) {
  const d = R.decimalsOf(text);
  const minor = R.parseAmount(text, d);
  if (minor === null) return;
  const before = state.balances.get(currency);
  state.decimals.set(currency, d);
  state.balances.set(currency, minor);
  if (currency === state.currency) renderBalance(before === undefined ? 0 : (minor > before ? 1 : minor < before ? -1 : 0));
}

export function renderCurrencies() {
  const sel = $("currency");
  const high = $("high-currency");
  const names = [...state.balances.keys()];
  if (!names.includes(state.currency)) state.currency = names[0];
  sel.replaceChildren(...names.map((c) => new Option(c, c, false, c === state.currency)));
  const highValue = high.value;
  high.replaceChildren(...names.map((c) => new Option(c, c, false, c === highValue)));
  renderBalance();
}

export function switchCurrency(currency) {
  state.currency = currency;
  localStorage.setItem(CUR_KEY, currency);
  const bal = state.balances.get(currency) ?? 0n;
  let amount = bal / 1000n;
  if (amount < 1n) amount = 1n;
  $("amount").value = fmt(amount);
  renderBalance();
  updateBetPanel();
}
