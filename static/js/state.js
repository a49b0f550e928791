// What the page knows: the signed-in player, balances, the bet being set up, history, and
// the player's own copy of bets and revealed pairs in localStorage.

import * as R from "./rules.js";

export const TOKEN_KEY = "stakepro.token";
export const CUR_KEY = "stakepro.currency";
export const MAX_HISTORY = 100;

export const state = {
  token: localStorage.getItem(TOKEN_KEY),
  userId: null,
  balances: new Map(),     // currency -> BigInt minor units
  decimals: new Map(),     // currency -> decimals
  limits: new Map(),       // currency -> {min, max, maxProfit} in BigInt minor units (GET /api/limits)
  currency: localStorage.getItem(CUR_KEY) || "USDT",
  seed: { server_seed_hash: "", client_seed: "", nonce: 0 },
  direction: "under",
  target: 5000,            // hundredths
  history: [],             // bet records, newest first
  revealed: [],            // revealed pairs, newest first
  sock: null,
  inFlight: false,
  auto: null,              // {run, stop: bool}
  mode: "manual",
  lastRoll: 5000,
};

export const dec = () => state.decimals.get(state.currency) ?? 2;
export const fmt = (minor, d = dec()) => R.formatAmount(minor, d);
const storeKey = (what) => `stakepro.${state.userId}.${what}`;

export function save() {
  if (state.userId === null) return;
  try {
    localStorage.setItem(storeKey("bets"), JSON.stringify(state.history.slice(0, MAX_HISTORY)));
    localStorage.setItem(storeKey("revealed"), JSON.stringify(state.revealed.slice(0, 50)));
  } catch { /* storage full: the page works on without it */ }
}

export function load(what) {
  try { return JSON.parse(localStorage.getItem(storeKey(what)) || "[]"); } catch { return []; }
}
