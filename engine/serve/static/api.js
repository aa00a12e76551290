// HTTP for the search page: every request goes to this page's own server, with the tab's API key when one is
// set; a failed answer becomes a PageError whose message is "status: the server's detail".

const KEY_STORAGE = "cnclip-api-key";

/** A problem to show in the page: a failed request (`status` set, `message` holds the body's `detail`)
 *  or a bad entry in the page itself (`status` null). */
export class PageError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

/** Keep `key` for this tab only (sessionStorage); an empty key removes it. */
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
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

export async function request(path, options = {}) {
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

export async function getJson(path) {
  return (await request(path)).json();
}

/** POST a JSON body; fields that are undefined are left out (JSON.stringify drops them). */
export async function postJson(path, body) {
  const response = await request(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

/** POST an image as multipart `image`, with `fields` as form fields (objects and numbers as JSON strings). */
export async function postImage(path, file, fields) {
  const form = new FormData();
  form.append("image", file, file.name || "image");
  for (const [name, value] of Object.entries(fields)) {
    if (value !== undefined) form.append(name, typeof value === "string" ? value : JSON.stringify(value));
  }
  const response = await request(path, { method: "POST", body: form });
  return response.json();
}

/** The URL path of an image's thumbnail: the id is one encoded path segment, so `/`, `%`, `..`, spaces and
 *  non-ASCII in an id reach the server's `{id:path}` route as the id itself. */
export function thumbnailPath(id) {
  return `/v1/images/${encodeURIComponent(String(id))}/thumbnail`;
}

/** The stored thumbnail (JPEG, about 256 px) as a Blob, fetched with the key header. */
export async function thumbnailBlob(id) {
  return (await request(thumbnailPath(id))).blob();
}
