// The evidence overlay: the LACLIP crops an explained image hit carries (`"explain": true`), drawn over its
// picture. Boxes are in the original image's pixels; the SVG's viewBox is the original size, so the browser
// scales them to whatever size the picture is shown at (the picture uses object-fit: contain, the SVG "meet").

import { el, svgEl } from "./dom.js";

function validEvidence(evidence) {
  return Boolean(evidence) && Array.isArray(evidence.image_size) && evidence.image_size.length === 2
    && Array.isArray(evidence.crops) && evidence.crops.every((c) => Array.isArray(c.box) && c.box.length === 4);
}

function cropText(crop) {
  const similarity = typeof crop.similarity === "number" ? crop.similarity.toFixed(3) : "?";
  const weight = typeof crop.weight === "number" ? crop.weight.toFixed(3) : "?";
  return `[${crop.box.map((v) => Math.round(v)).join(", ")}] 相似度 similarity ${similarity} 权重 weight ${weight}`;
}

/** An SVG of every crop's box (the best one marked `best`, drawn last so it stays on top) and a text for
 *  screen readers naming the best crop; null when the hit has no evidence. */
export function evidenceOverlay(evidence) {
  if (!validEvidence(evidence)) return null;
  const [width, height] = evidence.image_size;
  const svg = svgEl("svg", { class: "evidence", viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "xMidYMid meet", "aria-hidden": "true", focusable: "false" });
  const order = evidence.crops.map((crop, i) => ({ crop, i })).sort((a, b) => (a.i === evidence.best) - (b.i === evidence.best));
  for (const { crop, i } of order) {
    const [x0, y0, x1, y1] = crop.box;
    svg.append(svgEl("rect", { class: i === evidence.best ? "crop best" : "crop", "data-index": i,
      x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0), "vector-effect": "non-scaling-stroke" }));
  }
  const best = evidence.crops[evidence.best];
  const label = best ? `证据 Evidence: 最佳区域 best crop ${cropText(best)}` : "";
  return { svg, label: el("span", { class: "visually-hidden" }, label) };
}

/** One list item per crop (best first), for the hit view. */
export function evidenceList(evidence) {
  if (!validEvidence(evidence)) return null;
  const items = evidence.crops.map((crop, i) => ({ crop, i }))
    .sort((a, b) => (b.i === evidence.best) - (a.i === evidence.best));
  return el("ol", { class: "evidence-list" }, ...items.map(({ crop, i }) => el("li",
    { class: i === evidence.best ? "best" : "" }, `${i === evidence.best ? "★ " : ""}#${i} ${cropText(crop)}`)));
}
