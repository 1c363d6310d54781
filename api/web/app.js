// AfyaChain in the browser: plain ES modules, no library. Everything reaches the
// page through h() (text only via textContent); the bearer token lives in this
// module's memory only, never in storage or a URL.

const state = { token: null, lang: "en", words: {} };

/** An element with attributes and children (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value);
  }
  for (const child of children) {
    el.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

/** The sentence for `key` in the chosen language, with {placeholders} filled. */
function t(key, values = {}) {
  const text = state.words[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => values[name] ?? "");
}

async function loadLanguage(lang) {
  const resp = await fetch(`/assets/i18n/${lang}.json`);
  state.words = await resp.json();
  state.lang = lang;
  document.documentElement.lang = lang;
  for (const el of document.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n);
  }
}

/** A plain sentence for an API problem (never its raw JSON). */
function problemText(problem, status) {
  const byCode = problem && state.words[`errors.${problem.code}`];
  return byCode ?? state.words[`errors.status.${status}`] ?? t("errors.generic");
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = resp.status === 204 ? null : await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(problemText(data, resp.status));
  return data;
}

function show(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
  main.focus();
}

function signInPage(message) {
  const phone = h("input", { id: "phone", name: "phone", type: "tel", autocomplete: "tel", required: "" });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: "" });
  const error = h("p", { class: "error", role: "alert" }, message ?? "");
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        const session = await api("POST", "/v1/sessions", { phone: phone.value, password: password.value });
        state.token = session.token;
        signedInPage(session.role);
      } catch (e) {
        error.textContent = e.message;
      }
    },
  },
    h("h1", {}, t("signin.title")),
    h("label", { for: "phone" }, t("signin.phone")), phone,
    h("label", { for: "password" }, t("signin.password")), password,
    error,
    h("button", { type: "submit" }, t("signin.submit")));
  show(form);
}

function signedInPage(role) {
  show(
    h("p", { id: "who" }, t("signin.done", { role: t(`role.${role}`) })),
    h("button", {
      type: "button",
      onclick: async () => {
        try { await api("DELETE", "/v1/sessions/current"); } catch { /* signed out either way */ }
        state.token = null;
        signInPage();
      },
    }, t("signout.submit")));
}

document.getElementById("lang").addEventListener("change", async (event) => {
  await loadLanguage(event.target.value);
  if (state.token === null) signInPage();
});

await loadLanguage("en");
signInPage();
