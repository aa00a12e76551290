// The search page: plain browser JavaScript, no libraries, no build step. It calls the server's /v1 routes
// (see README "HTTP server") and renders their answers; every failure is shown in the page.
"use strict";

(() => {
  const KEY_STORAGE = "cnclip-api-key";
  const $ = (id) => document.getElementById(id);

  const state = {
    info: null,        // the /v1/info body
    counts: null,      // {images, texts} from /readyz, to keep k within the index
    search: null,      // the search on screen: {spec, query, label}
    offset: 0,         // index of the first hit on screen
    generation: 0,     // answers of superseded searches are dropped
    blobUrls: [],      // thumbnail object URLs of the results on screen
    imageFile: null,   // the query image (picker, drop or paste)
    previewUrl: null,
  };

  // ---- HTTP ------------------------------------------------------------------------------------------------

  /** A problem to show in the page: a failed request (`status` set, `message` holds the body's `detail`)
   *  or a bad entry in the page itself (`status` null). */
  class PageError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((e) => (e && e.msg ? `${(e.loc || []).join(".")}: ${e.msg}` : JSON.stringify(e))).join("; ");
    }
    return JSON.stringify(detail);
  }

  async function request(path, options = {}) {
    const headers = { ...authHeaders(), ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new PageError(0, `无法连接服务器 Cannot reach the server (${err.message})`);
    }
    if (!response.ok) {
      const text = await response.text();
      let detail = text.slice(0, 300) || response.statusText;
      try {
        const body = JSON.parse(text);
        if (body && body.detail !== undefined) detail = formatDetail(body.detail);
      } catch (_) {
        // not JSON (a proxy's page): show its start as it is
      }
      throw new PageError(response.status, `${response.status}: ${detail}`);
    }
    return response;
  }

  async function postJson(path, body) {
    const response = await request(path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    return response.json();
  }

  async function postImage(path, file, fields) {
    const form = new FormData();
    form.append("image", file, file.name || "image");
    for (const [name, value] of Object.entries(fields)) {
      if (value !== undefined) form.append(name, typeof value === "string" ? value : JSON.stringify(value));
    }
    const response = await request(path, { method: "POST", body: form });
    return response.json();
  }

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
      run: (text, k) => postJson("/v1/search/images", { query: text, k, laclip: laclipSettings() }),
    },
    imageToTexts: {
      results: "texts",
      limit: () => available("texts"),
      run: (file, k) => postImage("/v1/search/texts", file, { k: String(k), laclip: laclipSettings() }),
    },
    imageToImages: {
      results: "images",
      limit: () => available("images"),
      run: (file, k) => postImage("/v1/search/similar", file, { k: String(k) }),
    },
    similarToId: {
      results: "images",
      limit: () => available("images") - 1, // the image itself is left out
      run: (id, k) => postJson("/v1/search/similar", { id, k }),
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
      const limit = search.spec.limit();
      if (limit < 1) {
        renderResults(search, [], { offset: 0, k: 0, limit: 0 });
        $("results").dataset.state = "done";
        return;
      }
      const k = Math.min(offset + pageSize(), limit);
      const body = await search.spec.run(search.query, k);
      if (generation !== state.generation) return;
      renderResults(search, body.hits.slice(offset, k), { offset, k, limit, truncated: body.truncated === true });
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

  function searchByImage() {
    const file = state.imageFile;
    if (!file) {
      showError(new PageError(null, "请先选择图片 Choose an image first."));
      $("image-file").focus();
      return;
    }
    const target = document.querySelector("input[name=image-target]:checked").value;
    const spec = target === "similar" ? SEARCHES.imageToImages : SEARCHES.imageToTexts;
    const what = target === "similar" ? "相似图片 similar images" : "文字 texts";
    runSearch({ spec, query: file, label: `${what} ← ${file.name || "image"}` });
  }

  function setImage(file) {
    state.imageFile = file;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    const preview = $("image-preview");
    preview.alt = `查询图片 Query image: ${file.name || "image"}`;
    preview.hidden = false;
    preview.src = state.previewUrl;
    searchByImage();
  }

  // ---- rendering -------------------------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "class") node.className = value;
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function bilingual(zh, en) {
    return [`${zh} `, el("span", { lang: "en" }, en)];
  }

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

  function caption(hit) {
    const payload = hit.payload || {};
    if (typeof payload.text === "string") return payload.text;
    if (typeof payload.source === "string") return payload.source;
    return String(hit.id);
  }

  function scoreText(score) {
    return typeof score === "number" ? score.toFixed(4) : String(score);
  }

  /** Load a thumbnail through fetch() so the API key header goes with it (an <img src> cannot send one). */
  async function loadThumbnail(img, id) {
    try {
      const response = await request(`/v1/images/${encodeURIComponent(String(id))}/thumbnail`);
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

  function imageCard(hit, rank) {
    const text = caption(hit);
    const img = el("img", { alt: `图片 Image: ${text}`, decoding: "async" });
    const more = el("button", { type: "button", class: "more", ariaLabel: `更多类似 More like this: ${text}` },
      ...bilingual("更多类似", "More like this"));
    more.addEventListener("click", () => runSearch(
      { spec: SEARCHES.similarToId, query: hit.id, label: `与「${text}」相似 Like “${text}”` }, 0, { focusStatus: true }));
    const actions = el("div", { class: "actions" }, more);
    if (hit.payload && typeof hit.payload.text === "string") actions.append(textButton(hit.payload.text));
    return el("li", { class: "card", dataset: { id: String(hit.id), score: String(hit.score) } },
      el("figure", {}, el("div", { class: "thumb" }, img),
        el("figcaption", {}, el("span", { class: "caption", title: text }, text),
          el("span", { class: "meta" }, `#${rank} · ${scoreText(hit.score)}`))),
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

  function renderResults(search, hits, { offset, k, limit, truncated = false }) {
    clearResults();
    const images = search.spec.results === "images";
    if (hits.length === 0) {
      const empty = limit < 1
        ? (images ? "索引中没有图片。 The index holds no images." : "索引中没有文字。 The index holds no texts.")
        : "没有结果。 No results.";
      setStatus(`${search.label} · ${empty}`);
      return;
    }
    const list = el("ol", { class: images ? "grid" : "text-list", start: offset + 1 });
    hits.forEach((hit, i) => list.append(images ? imageCard(hit, offset + i + 1) : textRow(hit, offset + i + 1)));
    $("results").append(list);
    if (images) list.querySelectorAll("li.card img").forEach((img, i) => loadThumbnail(img, hits[i].id));
    const page = Math.floor(offset / pageSize()) + 1;
    const total = Number.isFinite(limit) ? ` / ${limit}` : "";
    const note = truncated ? " · 查询过长，已截断 The query was truncated" : "";
    const range = `${offset + 1}–${offset + hits.length}${total}`;
    setStatus(`${search.label} · 第 ${page} 页 Page ${page} · 结果 results ${range}${note}`);
    $("page-label").textContent = `第 ${page} 页 Page ${page}`;
    $("prev-page").disabled = offset === 0;
    $("next-page").disabled = Number.isFinite(limit) ? k >= limit : hits.length < pageSize();
    $("pager").hidden = false;
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
    const laclip = info.laclip;
    $("laclip-fields").disabled = !laclip;
    $("laclip-note").hidden = Boolean(laclip);
    $("laclip-on").checked = Boolean(laclip) && laclip.alpha !== 1;
    if (laclip) {
      if (typeof laclip.tau === "number") $("laclip-tau").value = laclip.tau;
      if (typeof laclip.alpha === "number") $("laclip-alpha").value = laclip.alpha;
      if (laclip.weights) $("laclip-weights").value = laclip.weights;
    }
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
    document.body.dataset.ready = "true";
  }

  function firstFile(dataTransfer) {
    return dataTransfer && dataTransfer.files.length ? dataTransfer.files[0] : null;
  }

  function rerunOnSettingsChange() {
    if (state.search) runSearch(state.search, 0);
  }

  function wire() {
    $("api-key").value = apiKey();
    $("api-key").addEventListener("input", (e) => {
      const key = e.target.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    });
    $("api-key").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && state.search) runSearch(state.search, state.offset);
    });
    $("key-clear").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("api-key").value = "";
      $("api-key").focus();
    });

    $("text-form").addEventListener("submit", (e) => {
      e.preventDefault();
      searchText($("query").value);
    });

    for (const example of document.querySelectorAll("button.example")) {
      example.addEventListener("click", () => searchText(example.textContent));
    }

    $("image-file").addEventListener("change", (e) => {
      if (e.target.files.length) setImage(e.target.files[0]);
    });
    $("image-search").addEventListener("click", searchByImage);
    for (const radio of document.querySelectorAll("input[name=image-target]")) {
      radio.addEventListener("change", () => { if (state.imageFile) searchByImage(); });
    }
    $("image-preview").addEventListener("error", () => { $("image-preview").hidden = true; });

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

    $("prev-page").addEventListener("click", () => runSearch(state.search, Math.max(0, state.offset - pageSize())));
    $("next-page").addEventListener("click", () => runSearch(state.search, state.offset + pageSize()));
    for (const id of ["page-size", "laclip-on", "laclip-tau", "laclip-alpha", "laclip-weights"]) {
      $(id).addEventListener("change", rerunOnSettingsChange);
    }
  }

  wire();
  loadInfo();
})();
