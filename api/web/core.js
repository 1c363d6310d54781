// What every page shares: the state, the one way to put things on the page (h, text
// only), the sentences of the chosen language, and the calls to the /v1 API. The
// bearer token lives in this module's memory only: never in storage, a cookie or a URL.

export const state = {
  token: null,
  role: null,
  subject: null,
  lang: "en",
  words: {},
  config: { max_upload_bytes: 0, payments: false, explorer_tx_url: null },
  // Timers and object URLs of the view on screen, ended when it changes.
  cleanups: [],
  // Draws the view on screen again (after a language switch).
  redraw: null,
  // Called when the API says the session is over.
  onSignedOut: null,
};

/** An element with attributes and children. Strings become text nodes; null, false
 *  and undefined are skipped, as are attributes with those values. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") el.addEventListener(name.replace(/^on/, ""), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** The sentence for `key` in the chosen language, with {placeholders} filled. */
export function t(key, values = {}) {
  const text = state.words[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

/** `t(key)` if the dictionary has it, else `fallback`. */
function tOr(key, fallback) {
  return key in state.words ? t(key) : fallback;
}

export async function loadLanguage(lang) {
  // Relative to this module, so the words come from the same version of the app.
  const resp = await fetch(new URL(`./i18n/${lang === "sw" ? "sw" : "en"}.json`, import.meta.url));
  if (!resp.ok) return;
  state.words = await resp.json();
  state.lang = lang;
  document.documentElement.lang = lang;
  for (const el of document.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n);
  }
}

/** An error of the API as a sentence in the chosen language. */
class ApiError extends Error {
  constructor(status, problem) {
    super(problemText(status, problem));
    this.status = status;
    this.code = problem?.code ?? null;
  }
}

function problemText(status, problem) {
  const code = problem?.code;
  if (code === "invalid_request" && problem.field) {
    const field = problem.field.replace(/\[\d+\]$/, "");
    return t("errors.field", { field: tOr(`field.${field}`, field) });
  }
  if (code && `errors.${code}` in state.words) return t(`errors.${code}`);
  if (`errors.status.${status}` in state.words) return t(`errors.status.${status}`);
  return t("errors.generic");
}

/** A fresh Idempotency-Key: a retry of the same action sends the same one. */
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

/** The sentence for any error: the API's, or a plain one for anything else. */
export function sentence(e) {
  return e instanceof ApiError ? e.message : t("errors.generic");
}

/** The error for a refused request; a 401 ends the session, but only when it answers
 *  the session's own token (not a late answer to an earlier one). */
function refused(status, problem, token) {
  const error = new ApiError(status, problem);
  if (status === 401 && token && token === state.token && state.onSignedOut) {
    state.onSignedOut(error.message);
  }
  return error;
}

/** Sends a request with the session's token; the answer if it is a success, else an
 *  ApiError (no network: `offline`). */
async function send(path, init = {}) {
  const token = state.token;
  let resp;
  try {
    resp = await fetch(path, { ...init, headers: { ...authHeaders(), ...init.headers } });
  } catch {
    throw new ApiError(0, { code: "offline" });
  }
  if (!resp.ok) throw refused(resp.status, await resp.json().catch(() => null), token);
  return resp;
}

/** A JSON call to the API; throws an ApiError with a sentence on failure. */
export async function api(method, path, body, key) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers["Idempotency-Key"] = key;
  const resp = await send(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 204) return null;
  try {
    return await resp.json();
  } catch {
    // Not our API's answer (a captive portal's page, a cut connection).
    throw new ApiError(resp.status, { code: "bad_answer" });
  }
}

/** Bytes from the API (a record, a QR code, an export) as a Blob. */
export async function fetchBlob(path) {
  const resp = await send(path);
  try {
    return await resp.blob();
  } catch {
    throw new ApiError(0, { code: "offline" });
  }
}

/** An object URL for `blob`, revoked when the view changes. */
export function blobUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.cleanups.push(() => URL.revokeObjectURL(url));
  return url;
}

/** Saves `blob` as a file named `name` on the user's device; the bytes are let go
 *  once the browser has taken them. */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name || "record" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

/** Sends a file's raw bytes with its media type, reporting progress (0 to 1). `key`
 *  is the same for every attempt at the same file, so a retry stores it once. */
export function uploadFile(path, file, key, onProgress) {
  return new Promise((resolve, reject) => {
    const token = state.token;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    xhr.setRequestHeader("Idempotency-Key", key);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) {
        if (data) resolve(data);
        else reject(new ApiError(xhr.status, { code: "bad_answer" }));
      } else {
        reject(refused(xhr.status, data, token));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, { code: "offline" }));
    xhr.send(file);
  });
}

/** Calls `fn` after `ms`, unless the view changes first. */
export function later(ms, fn) {
  const id = setTimeout(fn, ms);
  state.cleanups.push(() => clearTimeout(id));
}

export function endView() {
  for (const cleanup of state.cleanups.splice(0)) cleanup();
}

// ---- formatting -------------------------------------------------------------------

export function fmtBytes(n) {
  if (n < 1024) return t("unit.bytes", { n });
  if (n < 1024 * 1024) return t("unit.kb", { n: (n / 1024).toFixed(1) });
  return t("unit.mb", { n: (n / 1024 / 1024).toFixed(1) });
}

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(state.lang === "sw" ? "sw-KE" : "en-KE", {
    timeZone: "Africa/Nairobi", dateStyle: "medium", timeStyle: "short",
  });
}

export function fmtDate(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso ?? "";
  return d.toLocaleDateString(state.lang === "sw" ? "sw-KE" : "en-KE", { timeZone: "Africa/Nairobi", dateStyle: "medium" });
}

export const CATEGORIES = ["lab", "imaging", "prescription", "diagnosis", "immunization", "clinical_note", "other"];

export function categoryName(c) {
  return tOr(`category.${c}`, c);
}

/** The lines every record card starts with: name, category, size, upload time. */
export function recordLines(r) {
  return [
    h("h3", {}, r.filename || t("records.untitled")),
    line("records.category", categoryName(r.category)),
    line("records.size", fmtBytes(r.size)),
    line("records.uploaded", fmtTime(r.uploaded_at)),
  ];
}

/** Moves the focus to the first heading inside `root` (made focusable). */
export function focusHeading(root) {
  const heading = root.querySelector("h1, h2");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
}

/** What an access request or grant covers, in words. */
export function scopeText(r) {
  const parts = r.categories.map(categoryName);
  if (r.record_ids.length) parts.push(t("scope.records", { n: r.record_ids.length }));
  return parts.join(", ");
}

// ---- building blocks --------------------------------------------------------------

/** A labelled input: the label names the control for screen readers. */
export function field(id, labelKey, control, hintKey) {
  control.id = id;
  if (!control.name) control.name = id;
  const hint = hintKey ? h("p", { class: "hint", id: `${id}-hint` }, t(hintKey)) : null;
  if (hint) control.setAttribute("aria-describedby", hint.id);
  return h("div", { class: "field" }, h("label", { for: id }, t(labelKey)), control, hint);
}

/** A message line for a form: errors are announced (role=alert), notices politely. */
export function messageLine(id) {
  const el = h("p", { class: "message", id, role: "status", "aria-live": "polite" });
  el.showError = (text) => { el.className = "message error"; el.setAttribute("role", "alert"); el.textContent = text; };
  el.showNotice = (text) => { el.className = "message notice"; el.setAttribute("role", "status"); el.textContent = text; };
  el.showEmpty = (text) => { el.className = "message empty"; el.setAttribute("role", "status"); el.textContent = text; };
  el.clear = () => { el.className = "message"; el.textContent = ""; };
  return el;
}

/** Runs `action` with `buttons` (one or several) disabled, so nothing is sent twice;
 *  errors go to `message`. */
export async function busy(buttons, message, action) {
  const all = Array.isArray(buttons) ? buttons : [buttons];
  for (const b of all) { b.disabled = true; b.setAttribute("aria-busy", "true"); }
  message?.clear();
  try {
    await action();
  } catch (e) {
    if (message) message.showError(sentence(e));
    else throw e;
  } finally {
    for (const b of all) { b.disabled = false; b.removeAttribute("aria-busy"); }
  }
}

export function button(labelKey, onclick, attrs = {}) {
  return h("button", { type: "button", ...attrs, onclick }, t(labelKey));
}

export function section(id, titleKey, ...children) {
  return h("section", { id, "aria-labelledby": `${id}-title` }, h("h2", { id: `${id}-title` }, t(titleKey)), ...children);
}

/** A list loaded page by page: `load(cursor)` answers `{items, next_cursor}` and `item`
 *  draws one. Shows "Loading…", the empty sentence, errors, and a "More" button. */
export function pagedList(id, emptyKey, load, item, keep = () => true) {
  const list = h("ul", { class: "cards", id });
  const message = messageLine(`${id}-message`);
  const more = h("div", { class: "more" });
  const holder = h("div", {}, list, message, more);
  // A page may hold nothing to show (a doctor's view is filtered after paging): then
  // the next one is fetched, up to a few, before "Show more" is offered.
  async function page(cursor, fromButton) {
    message.showNotice(t("app.loading"));
    const before = list.children.length;
    let next = cursor;
    try {
      for (let tries = 0; tries < 5; tries++) {
        const data = await load(next);
        for (const row of data.items.filter(keep)) list.append(item(row));
        next = data.next_cursor ?? null;
        if (next === null || list.children.length > before) break;
      }
      message.clear();
      more.replaceChildren();
      if (next !== null) {
        more.append(button("app.more", () => page(next, true), { id: `${id}-more`, class: "secondary" }));
      } else if (!list.children.length) {
        message.showEmpty(t(emptyKey));
      }
      // The keyboard goes on from the first new item.
      const first = list.children[before];
      if (fromButton && first) { first.setAttribute("tabindex", "-1"); first.focus(); }
    } catch (e) {
      // "Show more" stays, to try again.
      message.showError(sentence(e));
      if (!more.children.length) {
        more.append(button("app.retry", () => page(next, fromButton), { id: `${id}-more`, class: "secondary" }));
      }
    }
  }
  page(null, false);
  return holder;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** A label: value line of a card. */
export function line(labelKey, value, cls) {
  return h("p", { class: cls ?? "line" }, h("span", { class: "k" }, t(labelKey)), " ", h("span", { class: "v" }, value));
}

export function badge(key, kind) {
  return h("span", { class: `badge ${kind ?? ""}` }, t(key));
}
