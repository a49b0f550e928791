// Keyboard shortcuts (listed on the page) when no text field has the focus.

import { state } from "./state.js";
import { scaleAmount, setDirection, setMode, setTarget } from "./betpanel.js";
import { play, toggleAutobet } from "./autobetpanel.js";
import { openProof } from "./mybets.js";

export function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  const tag = t && t.tagName;
  const typing = (tag === "INPUT" && t.type !== "range") || tag === "TEXTAREA" || tag === "SELECT" || (t && t.isContentEditable);
  if (typing) return;
  const onControl = tag === "BUTTON" || tag === "A" || tag === "TR";
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  const actions = {
    " ": play,
    Enter: play,
    h: () => scaleAmount("half"),
    d: () => scaleAmount("double"),
    m: () => scaleAmount("max"),
    u: () => setDirection("under"),
    o: () => setDirection("over"),
    "[": () => setTarget(state.target - 100),
    "]": () => setTarget(state.target + 100),
    a: () => { if (!state.auto) setMode("auto"); toggleAutobet(); },
    v: () => { if (state.history[0]) openProof(state.history[0]); },
  };
  if ((key === " " || key === "Enter") && onControl) return;   // let the focused control act
  const act = actions[key];
  if (!act) return;
  e.preventDefault();
  act();
}
