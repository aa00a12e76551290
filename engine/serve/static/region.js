// Draw-a-box on the query image: a box dragged with the pointer over the preview, or typed into the numeric
// x0, y0, x1, y1 fields (the keyboard way), in pixels of the uploaded image. It is sent as `"box"` (only that
// region is encoded) with an image search; "contains this detail" (similar images) sends `"against": "crops"`
// (the region compared with every indexed image's crops instead of its whole picture).

import { $ } from "./dom.js";
import { PageError } from "./api.js";

const FIELDS = ["box-x0", "box-y0", "box-x1", "box-y1"];
const MIN_DRAG_PX = 3; // a click without a drag draws no box

let size = null; // [width, height] of the query image, once it has loaded
let dragStart = null;

function fieldValues() {
  return FIELDS.map((id) => $(id).value.trim());
}

function setFields(box) {
  FIELDS.forEach((id, i) => { $(id).value = box ? String(box[i]) : ""; });
}

/** Where a pointer event falls, in the image's pixels (clamped to the image). */
function imagePoint(event) {
  const frame = $("region-overlay").getBoundingClientRect();
  const x = ((event.clientX - frame.left) / frame.width) * size[0];
  const y = ((event.clientY - frame.top) / frame.height) * size[1];
  return [Math.round(Math.min(Math.max(x, 0), size[0])), Math.round(Math.min(Math.max(y, 0), size[1]))];
}

function boxBetween([ax, ay], [bx, by]) {
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

/** Draw the box the fields hold (if complete and valid) over the preview. */
function drawFields() {
  const rect = $("region-rect");
  const values = fieldValues().map(Number);
  const complete = fieldValues().every((v) => v !== "") && values.every(Number.isFinite);
  const [x0, y0, x1, y1] = values;
  rect.toggleAttribute("hidden", !(complete && x1 > x0 && y1 > y0));
  if (!rect.hasAttribute("hidden")) {
    rect.setAttribute("x", x0);
    rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0);
    rect.setAttribute("height", y1 - y0);
  }
}

/** The box to send: undefined when no field is filled; a PageError naming the fault when it is incomplete
 *  or empty. */
export function regionBox() {
  const values = fieldValues();
  if (values.every((v) => v === "")) return undefined;
  const box = values.map(Number);
  if (values.some((v) => v === "") || !box.every(Number.isFinite) || !(box[2] > box[0] && box[3] > box[1])) {
    throw new PageError(null, `区域无效 The region is invalid: x0 ${values[0] || "?"}, y0 ${values[1] || "?"}, `
      + `x1 ${values[2] || "?"}, y1 ${values[3] || "?"} (需要 x1 > x0, y1 > y0; needs x1 > x0 and y1 > y0)`);
  }
  return box;
}

export function againstCrops() {
  return $("against-crops").checked;
}

/** Show `url` (the query image) in the editor and forget the previous image's box. */
export function setRegionImage(url, name) {
  size = null;
  setFields(null);
  drawFields();
  const preview = $("image-preview");
  preview.alt = `查询图片 Query image: ${name}`;
  preview.src = url;
  $("region-editor").hidden = false;
}

function onPreviewLoad() {
  const preview = $("image-preview");
  size = [preview.naturalWidth, preview.naturalHeight];
  $("region-overlay").setAttribute("viewBox", `0 0 ${size[0]} ${size[1]}`);
  FIELDS.forEach((id, i) => { $(id).max = String(size[i % 2]); });
  $("region-size").textContent = `${size[0]} × ${size[1]} px`;
}

/** Wire the editor; `onChange` runs when a box is drawn, typed, cleared or the mode changes. */
export function setupRegion(onChange) {
  const overlay = $("region-overlay");
  $("image-preview").addEventListener("load", onPreviewLoad);
  $("image-preview").addEventListener("error", () => { $("region-editor").hidden = true; });
  overlay.addEventListener("pointerdown", (event) => {
    if (!size) return;
    event.preventDefault();
    overlay.setPointerCapture(event.pointerId);
    dragStart = imagePoint(event);
  });
  overlay.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    setFields(boxBetween(dragStart, imagePoint(event)));
    drawFields();
  });
  overlay.addEventListener("pointerup", (event) => {
    if (!dragStart) return;
    const box = boxBetween(dragStart, imagePoint(event));
    dragStart = null;
    const dragged = box[2] - box[0] >= MIN_DRAG_PX && box[3] - box[1] >= MIN_DRAG_PX;
    setFields(dragged ? box : null);
    drawFields();
    onChange();
  });
  for (const id of FIELDS) {
    $(id).addEventListener("input", drawFields);
    $(id).addEventListener("change", onChange);
  }
  $("box-clear").addEventListener("click", () => {
    setFields(null);
    drawFields();
    onChange();
  });
  $("against-crops").addEventListener("change", onChange);
}
