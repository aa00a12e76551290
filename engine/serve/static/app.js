// The search page: plain browser JavaScript modules, no libraries, no build step. It calls the server's /v1
// routes (see README "HTTP server") and renders their answers; every failure is shown in the page.

import { PageError, apiKey, getJson, postImage, postJson, request, setApiKey, thumbnailPath } from "./api.js";
import { $, bilingual, el, scoreText } from "./dom.js";
import { evidenceOverlay } from "./evidence.js";
import { notePayloads, offerKeys, setupFilters, whereClause } from "./filters.js";
import { closeHitView, openHitView, setupHitView } from "./hitview.js";
import { againstCrops, regionBox, setRegionImage, setupRegion } from "./region.js";

const state = {
  info: null,        // the /v1/info body
  counts: null,      // {images, texts} from /readyz, to keep k within the index
  search: null,      // the search on screen: {spec, query, label}
  offset: 0,         // index of the first hit on screen
  generation: 0,     // answers of superseded searches are dropped
  blobUrls: [],      // thumbnail object URLs of the results on screen
  imageFile: null,   // the query image (picker, drop or paste)
  previewUrl: null,
  paired: new Map(), // image id -> texts whose payload's image_ids name it (read once, before the first search)
  extras: null,      // the promise of reading the pairs and the payload keys (null: not yet, or to retry)
};

// ---- settings --------------------------------------------------------------------------------------------

function pageSize() {
  return Number($("page-size").value);
}

function numberField(id, name) {
  const input = $(id);
  const value = Number(input.value);
  if (input.value.trim() === "" || !input.checkValidity() || !Number.isFinite(value)) {
    const why = input.validationMessage || "not a number";
    throw new PageError(null, `${name} 无效 is invalid: ${JSON.stringify(input.value)} (${why})`);
  }
  return value;
}

/** The "laclip" body field: undefined (server settings) when the index has no crops; off means alpha 1. */
function laclipSettings() {
  if (!state.info || !state.info.laclip) return undefined;
  if (!$("laclip-on").checked) return { alpha: 1 };
  return {
    tau: numberField("laclip-tau", "tau"),
    alpha: numberField("laclip-alpha", "alpha"),
    weights: $("laclip-weights").value,
  };
}

/** The fields every image search shares: the payload filter, evidence and duplicate collapsing (each sent
 *  only when in use). */
function imageSearchOptions() {
  return {
    where: whereClause(),
    explain: $("explain").checked && !$("explain").disabled ? true : undefined,
    collapse: $("collapse").checked ? "duplicates" : undefined,
  };
}

/** "without" (negative) text and its weight, for text -> images. */
function negativeOptions() {
  const negative = $("negative").value.trim();
  if (!negative) return {};
  return { negative, negative_weight: numberField("negative-weight", "不含权重 without weight") };
}

// ---- searches --------------------------------------------------------------------------------------------

/** How many hits a search over `what` ("images" or "texts") can ask for; Infinity when not known. */
function available(what) {
  const count = state.counts && Number.isInteger(state.counts[what]) ? state.counts[what] : Infinity;
  const maxK = state.info && Number.isInteger(state.info.max_k) ? state.info.max_k : Infinity;
  return Math.min(count, maxK);
}

const SEARCHES = {
  textToImages: {
    results: "images",
    limit: () => available("images"),
    run: (text, k) => postJson("/v1/search/images",
      { query: text, k, laclip: laclipSettings(), ...negativeOptions(), ...imageSearchOptions() }),
  },
  imageToTexts: {
    results: "texts",
    limit: () => available("texts"),
    run: (file, k) => postImage("/v1/search/texts", file, { k: String(k), laclip: laclipSettings(), box: regionBox() }),
  },
  imageToImages: {
    results: "images",
    limit: () => available("images"),
    run: (file, k) => postImage("/v1/search/similar", file, {
      k: String(k), ...imageSearchOptions(), box: regionBox(), against: againstCrops() ? "crops" : undefined,
    }),
  },
  similarToId: {
    results: "images",
    limit: () => available("images") - 1, // the image itself is left out
    run: (id, k) => postJson("/v1/search/similar", { id, k, ...imageSearchOptions() }),
  },
  duplicates: {
    results: "groups",
    run: (threshold) => getJson(`/v1/index/duplicates?threshold=${encodeURIComponent(threshold)}&limit=100`),
  },
};

/** Update the index counts from /readyz (public); on failure the old counts stay. */
async function refreshCounts() {
  try {
    const response = await fetch("/readyz");
    if (!response.ok) return;
    const body = await response.json();
    state.counts = { images: body.images, texts: body.texts };
  } catch (_) {
    // the search itself will report an unreachable server
  }
}

async function runSearch(search, offset = 0, { focusStatus = false } = {}) {
  const generation = ++state.generation;
  state.search = search;
  state.offset = offset;
  showError(null);
  $("results").setAttribute("aria-busy", "true");
  $("results").dataset.state = "busy";
  setStatus(`搜索中… Searching… ${search.label}`);
  try {
    await refreshCounts();
    await loadIndexExtras();
    if (search.spec.results === "groups") {
      const body = await search.spec.run(search.query);
      if (generation !== state.generation) return;
      renderGroups(search, body);
    } else if (search.spec.limit() < 1) {
      clearResults();
      const empty = search.spec.results === "images" ? "索引中没有图片。 The index holds no images."
        : "索引中没有文字。 The index holds no texts.";
      setStatus(`${search.label} · ${empty}`);
    } else {
      const limit = search.spec.limit();
      const k = Math.min(offset + pageSize(), limit);
      const body = await search.spec.run(search.query, k);
      if (generation !== state.generation) return;
      // fewer hits than asked for (a filter, collapsed duplicates): that is all there is
      const total = body.hits.length < k ? body.hits.length : limit;
      renderResults(search, body.hits.slice(offset, k), { offset, k, total, truncated: body.truncated === true });
    }
    $("results").dataset.state = "done";
  } catch (err) {
    if (generation !== state.generation) return;
    showError(err);
    clearResults();
    setStatus("搜索失败，见上方错误。 Search failed: see the error above.");
    $("results").dataset.state = "error";
  } finally {
    if (generation === state.generation) $("results").removeAttribute("aria-busy");
    if (focusStatus) $("status").focus();
  }
}

function searchText(text, options) {
  const query = text.trim();
  if (!query) {
    showError(new PageError(null, "请输入查询文字 Type a query first."));
    $("query").focus();
    return;
  }
  $("query").value = query;
  runSearch({ spec: SEARCHES.textToImages, query, label: `“${query}”` }, 0, options);
}

function imageTarget() {
  return document.querySelector("input[name=image-target]:checked").value;
}

function searchByImage() {
  const file = state.imageFile;
  if (!file) {
    showError(new PageError(null, "请先选择图片 Choose an image first."));
    $("image-file").focus();
    return;
  }
  const similar = imageTarget() === "similar";
  const spec = similar ? SEARCHES.imageToImages : SEARCHES.imageToTexts;
  const what = similar ? "相似图片 similar images" : "文字 texts";
  runSearch({ spec, query: file, label: `${what} ← ${file.name || "image"}` });
}

function moreLikeThis(hit, text) {
  runSearch({ spec: SEARCHES.similarToId, query: hit.id, label: `与「${text}」相似 Like “${text}”` }, 0,
    { focusStatus: true });
}

function findDuplicates() {
  const threshold = numberOrError("dup-threshold", "阈值 threshold");
  if (threshold === null) return;
  runSearch({ spec: SEARCHES.duplicates, query: threshold, label: `重复图片 Duplicates ≥ ${threshold}` }, 0,
    { focusStatus: true });
}

function numberOrError(id, name) {
  try {
    return numberField(id, name);
  } catch (err) {
    showError(err);
    $(id).focus();
    return null;
  }
}

function setImage(file) {
  state.imageFile = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  setRegionImage(state.previewUrl, file.name || "image");
  searchByImage();
}

// ---- rendering -------------------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(err) {
  const box = $("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = err.message || String(err);
  if (err.status === 401) {
    $("key-panel").hidden = false;
    box.append(" — 请在上方输入 API 密钥。 Enter the API key above.");
  }
  box.hidden = false;
}

function clearResults() {
  for (const url of state.blobUrls) URL.revokeObjectURL(url);
  state.blobUrls = [];
  $("results").replaceChildren();
  $("pager").hidden = true;
}

function pairedCaptions(id) {
  return state.paired.get(String(id)) || [];
}

/** What a card says: a paired caption (a text whose image_ids name the image), else the payload's text,
 *  caption (WebDataset) or title (IIIF), else its source, else the id. */
function caption(hit) {
  const paired = pairedCaptions(hit.id);
  if (paired.length) return paired[0];
  const payload = hit.payload || {};
  for (const key of ["text", "caption", "title", "source"]) {
    if (typeof payload[key] === "string") return payload[key];
  }
  return String(hit.id);
}

/** Load a thumbnail through fetch() so the API key header goes with it (an <img src> cannot send one). */
async function loadThumbnail(img, id) {
  try {
    const response = await request(thumbnailPath(id));
    const blob = await response.blob();
    if (!img.isConnected) return; // a newer search replaced these results
    const url = URL.createObjectURL(blob);
    state.blobUrls.push(url);
    img.src = url;
  } catch (err) {
    if (!img.isConnected) return;
    img.closest("li").classList.add("no-thumb");
    img.replaceWith(el("p", { class: "thumb-missing" }, ...bilingual("无缩略图", `No thumbnail (${err.message})`)));
  }
}

function openHit(hit, img) {
  const text = caption(hit);
  openHitView(hit, {
    caption: text,
    captions: pairedCaptions(hit.id),
    thumbUrl: img.isConnected && img.complete && img.naturalWidth > 0 ? img.src : null,
    k: Math.min(5, available("texts")),
    laclip: laclipSettings,
    onMoreLikeThis: () => moreLikeThis(hit, text),
    onSearchText: (words) => searchText(words, { focusStatus: true }),
  });
}

function imageCard(hit, rank) {
  const text = caption(hit);
  const img = el("img", { alt: `图片 Image: ${text}`, decoding: "async" });
  const thumb = el("button", { type: "button", class: "thumb" }, img,
    el("span", { class: "visually-hidden" }, `查看详情 View details: ${text}`));
  const overlay = evidenceOverlay(hit.evidence);
  if (overlay) thumb.append(overlay.svg, overlay.label);
  thumb.addEventListener("click", () => openHit(hit, img));
  const more = el("button", { type: "button", class: "more", ariaLabel: `更多类似 More like this: ${text}` },
    ...bilingual("更多类似", "More like this"));
  more.addEventListener("click", () => moreLikeThis(hit, text));
  const actions = el("div", { class: "actions" }, more);
  if (hit.payload && typeof hit.payload.text === "string") actions.append(textButton(hit.payload.text));
  const meta = rank === null ? `id ${hit.id}` : `#${rank} · ${scoreText(hit.score)}`;
  const source = hit.payload && typeof hit.payload.source === "string" ? hit.payload.source : String(hit.id);
  return el("li", { class: "card", dataset: { id: String(hit.id), score: String(hit.score) } },
    el("figure", {}, thumb,
      el("figcaption", {}, el("span", { class: "caption", title: `${text} (${source})` }, text),
        el("span", { class: "meta" }, meta))),
    actions);
}

function textButton(text) {
  const button = el("button", { type: "button", class: "by-text", ariaLabel: `以此文搜图 Search by this text: ${text}` },
    ...bilingual("以此文搜图", "Search by this text"));
  button.addEventListener("click", () => searchText(text, { focusStatus: true }));
  return button;
}

function textRow(hit, rank) {
  const text = caption(hit);
  return el("li", { class: "text-hit", dataset: { id: String(hit.id), score: String(hit.score) } },
    el("p", { class: "text", lang: "zh" }, text),
    el("span", { class: "meta" }, `#${rank} · ${scoreText(hit.score)} · id ${hit.id}`),
    textButton(text));
}

function loadThumbnails(list, hits) {
  list.querySelectorAll("li.card img").forEach((img, i) => loadThumbnail(img, hits[i].id));
}

/** Hits offset+1..offset+hits.length of `total` (Infinity when not known); k is how many were asked for. */
function renderResults(search, hits, { offset, k, total, truncated = false }) {
  clearResults();
  const images = search.spec.results === "images";
  if (hits.length === 0) {
    setStatus(`${search.label} · 没有结果。 No results.`);
    return;
  }
  if (images) notePayloads(hits.map((hit) => hit.payload));
  const list = el("ol", { class: images ? "grid" : "text-list", start: offset + 1 });
  hits.forEach((hit, i) => list.append(images ? imageCard(hit, offset + i + 1) : textRow(hit, offset + i + 1)));
  $("results").append(list);
  if (images) loadThumbnails(list, hits);
  const page = Math.floor(offset / pageSize()) + 1;
  const of = Number.isFinite(total) ? ` / ${total}` : "";
  const note = truncated ? " · 查询过长，已截断 The query was truncated" : "";
  const range = `${offset + 1}–${offset + hits.length}${of}`;
  setStatus(`${search.label} · 第 ${page} 页 Page ${page} · 结果 results ${range}${note}`);
  $("page-label").textContent = `第 ${page} 页 Page ${page}`;
  $("prev-page").disabled = offset === 0;
  $("next-page").disabled = Number.isFinite(total) ? k >= total : hits.length < pageSize();
  $("pager").hidden = false;
}

/** Duplicate groups (GET /v1/index/duplicates): one section of thumbnails per group. */
function renderGroups(search, body) {
  clearResults();
  const groups = body.groups || [];
  groups.forEach((group, g) => {
    const hits = group.members.map((id) => ({ id, score: null, payload: null }));
    const list = el("ol", { class: "grid" }, ...hits.map((hit) => imageCard(hit, null)));
    $("results").append(el("section", { class: "dup-group", dataset: { size: String(group.size) } },
      el("h3", {}, `组 Group ${g + 1} · ${group.size} 张 images`), list));
    loadThumbnails(list, hits);
  });
  const count = groups.length ? `${groups.length} 组 groups` : "没有重复。 No duplicates.";
  setStatus(`${search.label} · ${count}`);
}

// ---- start-up --------------------------------------------------------------------------------------------

function describeServer(info, counts) {
  const parts = [`模型 model ${info.model}`];
  if (info.backend) parts.push(`${info.backend}${info.precision ? ` ${info.precision}` : ""}`);
  if (info.device) parts.push(info.device);
  if (counts) parts.push(`图片 images ${counts.images}`, `文字 texts ${counts.texts}`);
  parts.push(info.laclip ? `LACLIP K=${info.laclip.num_crops}` : "LACLIP 关 off");
  return parts.join(" · ");
}

function applyInfo(info) {
  state.info = info;
  $("key-panel").hidden = !info.auth;
  $("weights-banner").hidden = info.random_weights !== true;
  const laclip = info.laclip;
  $("laclip-fields").disabled = !laclip;
  $("laclip-note").hidden = Boolean(laclip);
  $("laclip-on").checked = Boolean(laclip) && laclip.alpha !== 1;
  $("explain").disabled = !laclip; // evidence is the crops: none without LACLIP
  if (laclip) {
    if (typeof laclip.tau === "number") $("laclip-tau").value = laclip.tau;
    if (typeof laclip.alpha === "number") $("laclip-alpha").value = laclip.alpha;
    if (laclip.weights) $("laclip-weights").value = laclip.weights;
  }
}

/** A small blank PNG: the query image of the request that lists paired texts (its ranking does not matter). */
function blankImage() {
  const canvas = el("canvas", { width: 32, height: 32 });
  return new Promise((resolve) => canvas.toBlob((blob) => resolve(new File([blob], "blank.png", { type: "image/png" }))));
}

/** Read which texts name which images in their payload's `image_ids` (as `--texts` and cn_clip's datasets
 *  pair them): one image -> texts search filtered on `image_ids` existing, as many as the server allows;
 *  each image's texts in text-id order. */
async function loadPairedCaptions() {
  const k = available("texts");
  if (!(k >= 1)) return true;
  try {
    const body = await postImage("/v1/search/texts", await blankImage(),
      { k: String(k), where: { image_ids: { $exists: true } } });
    const byTextId = [...body.hits].sort((a, b) => (String(a.id) < String(b.id) ? -1 : 1));
    for (const hit of byTextId) {
      const ids = hit.payload && Array.isArray(hit.payload.image_ids) ? hit.payload.image_ids : [];
      for (const id of ids) {
        const key = String(id);
        if (!state.paired.has(key)) state.paired.set(key, []);
        state.paired.get(key).push(hit.payload.text);
      }
    }
    return true;
  } catch (err) {
    console.warn("paired captions unavailable:", err.message);
    return err.status !== 401;
  }
}

/** Offer the payload keys the server has seen on images in the filter's key field. */
async function loadPayloadKeys() {
  try {
    offerKeys((await getJson("/v1/index/payload-keys?kind=images")).keys || []);
    return true;
  } catch (err) {
    console.warn("payload keys unavailable:", err.message);
    return err.status !== 401;
  }
}

/** Read the pairs and the payload keys once; a try refused for want of the API key is retried by the next
 *  search (after the key is entered). Other failures leave the page without them. */
function loadIndexExtras() {
  if (!state.extras) {
    state.extras = Promise.all([loadPairedCaptions(), loadPayloadKeys()]).then((done) => {
      if (!done.every(Boolean)) state.extras = null;
    });
  }
  return state.extras;
}

/** Read /v1/info (it answers 503 while the model loads: wait for it), then show what the server runs. */
async function loadInfo() {
  for (;;) {
    try {
      const response = await request("/v1/info");
      applyInfo(await response.json());
      break;
    } catch (err) {
      if (err.status !== 503) {
        showError(err);
        $("server-info").textContent = "无法读取服务器信息 Could not read the server's info.";
        return;
      }
      $("server-info").textContent = "模型加载中… Loading the model…";
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  await refreshCounts();
  $("server-info").textContent = describeServer(state.info, state.counts);
  if (!state.info.auth || apiKey()) await loadIndexExtras();
  document.body.dataset.ready = "true";
}

function firstFile(dataTransfer) {
  return dataTransfer && dataTransfer.files.length ? dataTransfer.files[0] : null;
}

function rerunOnSettingsChange() {
  if (state.search) runSearch(state.search, 0);
}

/** Re-run the search on screen when it is one the changed control applies to. */
function rerunIf(...specs) {
  return () => { if (state.search && specs.includes(state.search.spec)) runSearch(state.search, 0); };
}

function wireKey() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("input", (e) => setApiKey(e.target.value.trim()));
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && state.search) runSearch(state.search, state.offset);
  });
  $("key-clear").addEventListener("click", () => {
    setApiKey("");
    $("api-key").value = "";
    $("api-key").focus();
  });
}

function wireImageInput() {
  $("image-file").addEventListener("change", (e) => {
    if (e.target.files.length) setImage(e.target.files[0]);
  });
  $("image-search").addEventListener("click", searchByImage);
  for (const radio of document.querySelectorAll("input[name=image-target]")) {
    radio.addEventListener("change", () => {
      $("against-crops").disabled = imageTarget() !== "similar"; // texts have no crops
      if (state.imageFile) searchByImage();
    });
  }
  const zone = $("drop-zone");
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    const file = firstFile(e.dataTransfer);
    if (file) setImage(file);
  });
  document.addEventListener("paste", (e) => {
    const file = firstFile(e.clipboardData);
    if (file) {
      e.preventDefault();
      setImage(file);
    }
  });
}

function wire() {
  wireKey();
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchText($("query").value);
  });
  for (const example of document.querySelectorAll("button.example")) {
    example.addEventListener("click", () => searchText(example.textContent));
  }
  wireImageInput();
  setupRegion(rerunIf(SEARCHES.imageToImages, SEARCHES.imageToTexts));
  setupFilters(rerunIf(SEARCHES.textToImages, SEARCHES.imageToImages, SEARCHES.similarToId));
  setupHitView();
  $("dup-form").addEventListener("submit", (e) => {
    e.preventDefault();
    closeHitView();
    findDuplicates();
  });
  $("prev-page").addEventListener("click", () => runSearch(state.search, Math.max(0, state.offset - pageSize())));
  $("next-page").addEventListener("click", () => runSearch(state.search, state.offset + pageSize()));
  for (const id of ["page-size", "laclip-on", "laclip-tau", "laclip-alpha", "laclip-weights", "explain", "collapse"]) {
    $(id).addEventListener("change", rerunOnSettingsChange);
  }
  $("negative-weight").addEventListener("change", rerunIf(SEARCHES.textToImages));
}

wire();
loadInfo();
