// The hit view: a modal <dialog> for one image hit. It shows the picture large (the stored ~256 px thumbnail
// scaled up, or the IIIF full image when the payload has one and it loads), the evidence boxes, the payload,
// the texts paired with the image (`image_ids`), IIIF links, the texts that best match the image
// (POST /v1/search/texts with the thumbnail uploaded) and "more like this". Escape or the close button close
// it, and focus goes back to what opened it.

import { $, el, bilingual, safeHttpUrl, scoreText } from "./dom.js";
import { postImage, thumbnailBlob } from "./api.js";
import { evidenceList, evidenceOverlay } from "./evidence.js";

const BEST_TEXTS = 5;
let opener = null;
let generation = 0;
let ownUrl = null; // an object URL the view made for its picture (revoked when it closes)

function section(title, ...children) {
  return el("section", { class: "hit-section" }, el("h3", {}, ...title), ...children);
}

function payloadList(payload) {
  const entries = Object.entries(payload || {});
  if (entries.length === 0) return el("p", { class: "muted" }, ...bilingual("无", "None"));
  return el("dl", { class: "payload" }, ...entries.flatMap(([key, value]) => [
    el("dt", {}, key),
    el("dd", {}, typeof value === "string" ? value : JSON.stringify(value)),
  ]));
}

function link(url, zh, en, kind) {
  return el("li", {}, el("a", { href: url, target: "_blank", rel: "noopener noreferrer", dataset: { kind } },
    ...bilingual(zh, en)));
}

/** The IIIF links of `payload.iiif` ({image, region, canvas, manifest, viewer}); only http(s) URLs are
 *  linked. Null when the hit is not from a IIIF source. */
function iiifSection(iiif) {
  if (!iiif || typeof iiif !== "object") return null;
  const items = [];
  const image = safeHttpUrl(iiif.image);
  const region = safeHttpUrl(iiif.region);
  const viewer = safeHttpUrl(iiif.viewer);
  if (image) items.push(link(image, "IIIF 图像", "image", "image"));
  if (region) items.push(link(region, "区域", "region", "region"));
  if (viewer) items.push(link(viewer, "在查看器中打开", "open in viewer", "viewer"));
  const notes = [];
  if (typeof iiif.canvas === "string") notes.push(el("p", { class: "muted iiif-canvas" }, `canvas: ${iiif.canvas}`));
  if (typeof iiif.manifest === "string") notes.push(el("p", { class: "muted iiif-manifest" }, `manifest: ${iiif.manifest}`));
  return section(["IIIF"], el("ul", { id: "hit-iiif", class: "links" }, ...items), ...notes);
}

function bestTextsSection() {
  return section(bilingual("最匹配的文字", "Best texts"),
    el("p", { id: "hit-texts-status", class: "muted", ariaLive: "polite" }, "搜索中… Searching…"),
    el("ol", { id: "hit-texts", class: "hit-texts" }));
}

/** Show the texts that best match the image: its thumbnail (what the server stores) uploaded to
 *  /v1/search/texts. */
async function loadBestTexts(hit, blob, { k, laclip, onSearchText }, token) {
  const status = $("hit-texts-status");
  if (k < 1) {
    status.textContent = "索引中没有文字。 The index holds no texts.";
    return;
  }
  try {
    const file = new File([await blob], "thumbnail.jpg", { type: "image/jpeg" });
    const body = await postImage("/v1/search/texts", file, { k: String(k), laclip: laclip() });
    if (token !== generation) return;
    $("hit-texts").replaceChildren(...body.hits.map((text) => {
      const words = text.payload && typeof text.payload.text === "string" ? text.payload.text : String(text.id);
      const button = el("button", { type: "button", class: "by-text" }, ...bilingual("以此文搜图", "Search by this text"));
      button.addEventListener("click", () => { closeHitView(); onSearchText(words); });
      return el("li", { dataset: { id: String(text.id), score: String(text.score) } },
        el("span", { class: "text", lang: "zh" }, words), " ",
        el("span", { class: "meta" }, scoreText(text.score)), " ", button);
    }));
    status.textContent = `${body.hits.length} 条 texts（以缩略图搜索 searched with the thumbnail）`;
  } catch (err) {
    if (token === generation) status.textContent = err.message;
  }
}

/** Swap the large picture to the IIIF full image once (and only if) it loads. */
function preferIiifImage(img, iiif) {
  const url = iiif && safeHttpUrl(iiif.image);
  if (!url) return;
  const probe = new Image();
  probe.addEventListener("load", () => {
    if (!img.isConnected) return;
    img.src = url;
    img.dataset.source = "iiif";
  });
  probe.src = url;
}

/**
 * Open the hit view for an image `hit` ({id, score, payload, evidence?}).
 * context: {caption, captions (paired texts), thumbUrl (a loaded thumbnail's URL or null), k (texts to ask
 * for), laclip (the settings function), onMoreLikeThis(hit), onSearchText(text)}.
 */
export function openHitView(hit, context) {
  const token = ++generation;
  const dialog = $("hit-view");
  opener = document.activeElement;
  $("hit-title").textContent = context.caption;
  const blob = thumbnailBlob(hit.id);
  const img = el("img", { id: "hit-image", alt: `图片 Image: ${context.caption}` });
  const frame = el("div", { class: "hit-frame" }, img);
  const overlay = evidenceOverlay(hit.evidence);
  if (overlay) frame.append(overlay.svg, overlay.label);
  if (context.thumbUrl) img.src = context.thumbUrl;
  else blob.then((b) => { if (token === generation) img.src = ownUrl = URL.createObjectURL(b); }, () => {});
  img.dataset.source = "thumbnail";
  preferIiifImage(img, hit.payload && hit.payload.iiif);

  const more = el("button", { type: "button", id: "hit-more" }, ...bilingual("更多类似", "More like this"));
  more.addEventListener("click", () => { closeHitView(); context.onMoreLikeThis(hit); });
  const captions = context.captions.length
    ? el("ul", { id: "hit-captions" }, ...context.captions.map((text) => el("li", { lang: "zh" }, text)))
    : el("p", { id: "hit-captions", class: "muted" }, ...bilingual("没有配对的文字", "No paired texts"));
  const evidence = evidenceList(hit.evidence);
  $("hit-body").replaceChildren(
    el("figure", { class: "hit-figure" }, frame,
      el("figcaption", { class: "meta" }, `id ${hit.id}${typeof hit.score === "number" ? ` · ${scoreText(hit.score)}` : ""}`)),
    el("div", { class: "hit-details" },
      more,
      section(bilingual("配对文字", "Paired captions"), captions),
      ...[iiifSection(hit.payload && hit.payload.iiif)].filter(Boolean),
      bestTextsSection(),
      section(bilingual("数据", "Payload"), payloadList(hit.payload)),
      ...(evidence ? [section(bilingual("局部证据", "Evidence (crops)"), evidence)] : [])));
  dialog.dataset.id = String(hit.id);
  if (!dialog.open) dialog.showModal();
  $("hit-close").focus();
  loadBestTexts(hit, blob, context, token);
}

export function closeHitView() {
  if ($("hit-view").open) $("hit-view").close();
}

/** Wire the close button, and give focus back to the opener whenever the dialog closes (Escape included). */
export function setupHitView() {
  $("hit-close").addEventListener("click", closeHitView);
  $("hit-view").addEventListener("close", () => {
    generation++;
    if (ownUrl) URL.revokeObjectURL(ownUrl);
    ownUrl = null;
    if (opener && opener.isConnected) opener.focus();
    opener = null;
  });
}
