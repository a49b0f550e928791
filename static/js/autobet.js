// Autobet strategy, pure: given the settings and each result, the next amount or the reason to
// stop. Amounts are BigInt minor units; percentages are integer hundredths of a percent.

import { formatAmount, parseAmount, parseFixed } from "./rules.js";

/** Parse "25" / "12.5" percent into hundredths of a percent (2500 / 1250); null if bad. */
export function parsePercent(text) {
  return parseFixed(text, 5, 2);
}

/**
 * Read the autobet form values (strings) into a plan, or return {error}.
 * fields: {bets, onWin: "reset"|"increase", winPct, onLoss, lossPct, stopProfit, stopLoss, maxBet}
 */
export function makePlan(fields, baseAmount, decimals) {
  const bets = String(fields.bets || "0").trim();
  if (!/^[0-9]{1,7}$/.test(bets)) return { error: "Number of bets must be a whole number (0 = until stopped)" };
  const plan = { bets: Number(bets), base: baseAmount, decimals, onWin: fields.onWin, onLoss: fields.onLoss };
  for (const [key, field] of [["winPct", "winPct"], ["lossPct", "lossPct"]]) {
    const v = parsePercent(fields[field] || "0");
    if (v === null) return { error: "A percentage is a number with at most 2 decimals" };
    plan[key] = v;
  }
  for (const key of ["stopProfit", "stopLoss", "maxBet"]) {
    const text = String(fields[key] || "").trim();
    if (text === "" || /^0*(\.0*)?$/.test(text)) { plan[key] = null; continue; }
    const v = parseAmount(text, decimals);
    if (v === null) return { error: `Stop amount "${text}" is not a valid amount` };
    plan[key] = v;
  }
  return plan;
}

/** A running autobet: feed it each result with record(); next() gives the amount or a stop. */
export class AutobetRun {
  constructor(plan) {
    this.plan = plan;
    this.count = 0;
    this.profit = 0n;           // signed, minor units
    this.amount = plan.base;
    this.wins = 0;
    this.losses = 0;
  }

  fmt(v) { return formatAmount(v, this.plan.decimals); }

  record(result) {
    // result: {win, amount, payout} in minor units
    this.count += 1;
    this.profit += result.payout - result.amount;
    if (result.win) {
      this.wins += 1;
      this.amount = this.plan.onWin === "increase" ? grow(this.amount, this.plan.winPct) : this.plan.base;
    } else {
      this.losses += 1;
      this.amount = this.plan.onLoss === "increase" ? grow(this.amount, this.plan.lossPct) : this.plan.base;
    }
  }

  /** {amount} for the next bet, or {stop: reason}. */
  next() {
    const p = this.plan;
    if (p.bets > 0 && this.count >= p.bets) return { stop: `${this.count} of ${p.bets} bets placed` };
    if (p.stopProfit !== null && this.profit >= p.stopProfit) {
      return { stop: `profit ${this.fmt(this.profit)} reached the stop on profit (${this.fmt(p.stopProfit)})` };
    }
    if (p.stopLoss !== null && -this.profit >= p.stopLoss) {
      return { stop: `loss ${this.fmt(-this.profit)} reached the stop on loss (${this.fmt(p.stopLoss)})` };
    }
    if (p.maxBet !== null && this.amount > p.maxBet) {
      return { stop: `next bet ${this.fmt(this.amount)} would exceed the maximum bet (${this.fmt(p.maxBet)})` };
    }
    return { amount: this.amount };
  }
}

/** amount x (1 + pct), pct in hundredths of a percent, floored, and at least one minor unit more. */
export function grow(amount, pctHundredths) {
  if (pctHundredths === 0n) return amount;
  const next = (amount * (10000n + pctHundredths)) / 10000n;
  return next > amount ? next : amount + 1n;
}
