// Dice rules of PROTOCOL.md, pure and integer-only: shared by the bet panel, autobet and the
// in-page verify view. Amounts are BigInt minor units; targets and rolls are integer
// hundredths; multipliers are integer units of 1e-4 ("bp" below). No float touches money.

export const HOUSE_EDGE_BP = 100n;       // 1 %
export const OUTCOMES = 10001;           // rolls 0.00 ... 100.00
export const ACCEPT_BELOW = 1040104;     // 10001 x 104
export const WINDOWS = 12;
export const WINDOW_CHARS = 5;
export const MAX_WINNING = 9800;         // win chance at most 98 %

/** Number of decimals a currency uses, learnt from a decimal string of it ("100.00" -> 2). */
export function decimalsOf(text) {
  const dot = String(text).indexOf(".");
  return dot < 0 ? 0 : String(text).length - dot - 1;
}

/**
 * A decimal string with at most `wholeDigits` digits before the point and `decimals` after it,
 * as a BigInt count of 10^-decimals ("12.5", 3, 2 -> 1250n); null for anything else.
 */
export function parseFixed(text, wholeDigits, decimals) {
  const m = new RegExp(`^([0-9]{1,${wholeDigits}})(?:\\.([0-9]{0,${decimals}}))?$`).exec(String(text).trim());
  if (!m) return null;
  return BigInt(m[1]) * 10n ** BigInt(decimals) + BigInt((m[2] || "").padEnd(decimals, "0") || "0");
}

/** "10.5" -> 1050n for 2 decimals. Returns null when the text is not a valid amount. */
export function parseAmount(text, decimals) {
  return parseFixed(text, 20, decimals);
}

/** 1050n, 2 -> "10.50". */
export function formatAmount(minor, decimals) {
  const neg = minor < 0n;
  const s = (neg ? -minor : minor).toString().padStart(decimals + 1, "0");
  const whole = decimals ? s.slice(0, -decimals) : s;
  const frac = decimals ? "." + s.slice(-decimals) : "";
  return (neg ? "-" : "") + whole + frac;
}

/** "49.5" -> 4950; null if not a target-shaped string (0.00 ... 100.00). */
export function parseTarget(text) {
  const h = parseFixed(text, 3, 2);
  return h !== null && h <= 10000n ? Number(h) : null;
}

export function formatHundredths(h) {
  return `${Math.floor(h / 100)}.${String(h % 100).padStart(2, "0")}`;
}

export function formatMultiplier(bp) {
  const n = BigInt(bp);
  return `${n / 10000n}.${String(n % 10000n).padStart(4, "0")}`;
}

/** Winning outcomes W for a target in hundredths: T for under, 10000 - T for over. */
export function winningOutcomes(target, direction) {
  return direction === "under" ? target : 10000 - target;
}

export function validWinning(w) {
  return Number.isInteger(w) && w >= 1 && w <= MAX_WINNING;
}

/** The target (hundredths) that gives W winning outcomes in a direction. */
export function targetFor(w, direction) {
  return direction === "under" ? w : 10000 - w;
}

/** Valid target range (hundredths) for a direction: under 0.01..98.00, over 2.00..99.99. */
export function targetRange(direction) {
  return direction === "under" ? [1, MAX_WINNING] : [10000 - MAX_WINNING, 9999];
}

/** floor((1 - edge) x 10001 / W) in 1e-4 units, as a BigInt. */
export function multiplierBp(w) {
  return ((10000n - HOUSE_EDGE_BP) * BigInt(OUTCOMES)) / BigInt(w);
}

/** The W whose multiplier is nearest to a wanted multiplier in 1e-4 units. */
export function winningForMultiplier(bp) {
  if (bp <= 0n) return MAX_WINNING;
  const w0 = Number(((10000n - HOUSE_EDGE_BP) * BigInt(OUTCOMES)) / bp);
  let best = MAX_WINNING;
  let bestDiff = null;
  for (const w of [w0 - 1, w0, w0 + 1]) {
    if (!validWinning(w)) continue;
    const m = multiplierBp(w);
    const diff = m > bp ? m - bp : bp - m;
    if (bestDiff === null || diff < bestDiff) { best = w; bestDiff = diff; }
  }
  if (bestDiff === null) best = w0 < 1 ? 1 : MAX_WINNING;
  return best;
}

/** "2.5" -> 25000n (1e-4 units); null if malformed. */
export function parseMultiplier(text) {
  return parseFixed(text, 7, 4);
}

/** Win chance in hundredths of a percent equals W itself (W / 10001 rounded as the sites do). */
export function formatChance(w) {
  return formatHundredths(w);
}

/** floor(amount x multiplier) in minor units. */
export function payout(amount, multBp) {
  return (amount * BigInt(multBp)) / 10000n;
}

export function isWin(roll, target, direction) {
  return direction === "under" ? roll < target : roll > target;
}

// ---- HMAC and the roll ------------------------------------------------------------------

const enc = new TextEncoder();

export function toHex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function hasWebCrypto() {
  return typeof crypto !== "undefined" && !!crypto.subtle;
}

export async function sha256Hex(text) {
  return toHex(await crypto.subtle.digest("SHA-256", enc.encode(text)));
}

export async function hmacHex(serverSeed, clientSeed, nonce) {
  const key = await crypto.subtle.importKey(
    "raw", enc.encode(serverSeed), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return toHex(await crypto.subtle.sign("HMAC", key, enc.encode(`${clientSeed}:${nonce}`)));
}

/** Every step from an HMAC to a roll: windows tried (hex, value, accepted) and the roll. */
export function rollFromHmac(h) {
  if (!/^[0-9a-f]{64}$/.test(h)) throw new Error("an HMAC is 64 lowercase hex characters");
  const windows = [];
  let v = 0;
  for (let i = 0; i < WINDOWS; i++) {
    const hex = h.slice(i * WINDOW_CHARS, (i + 1) * WINDOW_CHARS);
    v = parseInt(hex, 16);
    const accepted = v < ACCEPT_BELOW;
    windows.push({ index: i, hex, value: v, accepted });
    if (accepted) break;
  }
  return { windows, roll: v % OUTCOMES };
}

/** The whole proof of one bet, computed in this browser. */
export async function verifyRoll(serverSeed, clientSeed, nonce) {
  const message = `${clientSeed}:${nonce}`;
  const hmac = await hmacHex(serverSeed, clientSeed, nonce);
  const { windows, roll } = rollFromHmac(hmac);
  const serverSeedHash = await sha256Hex(serverSeed);
  return { message, hmac, windows, roll, rollText: formatHundredths(roll), serverSeedHash };
}
