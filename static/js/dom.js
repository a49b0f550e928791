// Element lookup and construction, shared by every module of the page.

export const $ = (id) => document.getElementById(id);

/** A new element: `attrs` become attributes ("class" the class name), `children` its nodes or text. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
