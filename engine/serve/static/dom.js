// Small DOM helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

/** An element with properties (`class`, `dataset`, any DOM property) and children (nodes or strings). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "class") node.className = value;
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element with attributes and children. */
export function svgEl(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child);
  return node;
}

/** Chinese text followed by its English (marked lang="en"), as every label on the page reads. */
export function bilingual(zh, en) {
  return [`${zh} `, el("span", { lang: "en" }, en)];
}

/** `value` (absolute, or a path on this server such as a `--iiif-viewer` pattern's) as an absolute http(s) URL
 *  string, or null: payload URLs become links or image sources only when they cannot run script (no
 *  `javascript:` or `data:`). */
export function safeHttpUrl(value) {
  if (typeof value !== "string") return null;
  try {
    const url = new URL(value, window.location.href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (_) {
    return null;
  }
}

export function scoreText(score) {
  return typeof score === "number" ? score.toFixed(4) : String(score);
}
