// AfyaChain in the browser: plain ES modules, no library, no build step. This module
// is the shell: the language switch, signing up, in and out, and each role's tabs.

import {
  state, h, t, api, loadLanguage, field, messageLine, busy, endView, button, sentence,
  focusHeading,
} from "./core.js";
import { patientTabs } from "./patient.js";
import { doctorTabs } from "./doctor.js";
import { registrarTabs, auditorTabs } from "./staff.js";

const TABS = { patient: patientTabs, doctor: doctorTabs, registrar: registrarTabs, auditor: auditorTabs };

const main = () => document.getElementById("main");

/** Replaces what the page shows; the previous view's timers end. */
function show(...children) {
  endView();
  main().replaceChildren(...children);
}

// ---- signing in and up ------------------------------------------------------------

function passwordInput(autocomplete) {
  return h("input", { type: "password", autocomplete, required: true, minlength: 10, maxlength: 128 });
}

function phoneInput() {
  return h("input", { type: "tel", autocomplete: "tel", required: true, inputmode: "tel", placeholder: "07XX XXX XXX" });
}

async function signIn(phone, password) {
  const session = await api("POST", "/v1/sessions", { phone, password });
  state.token = session.token;
  state.role = session.role;
  state.subject = session.subject_id;
  signedIn();
}

function signInPage(notice, knownPhone) {
  state.redraw = () => signInPage();
  const phone = phoneInput();
  if (knownPhone) phone.value = knownPhone;
  const password = passwordInput("current-password");
  const message = messageLine("signin-message");
  if (notice) message.showError(notice);
  const submit = h("button", { type: "submit", id: "signin-submit" }, t("signin.submit"));
  const form = h("form", {
    id: "signin-form",
    onsubmit: (event) => {
      event.preventDefault();
      busy(submit, message, () => signIn(phone.value, password.value));
    },
  },
  h("h1", {}, t("signin.title")),
  field("phone", "field.phone", phone),
  field("password", "field.password", password),
  message,
  submit);
  show(form,
    h("p", { class: "alt" }, t("signup.prompt")),
    h("div", { class: "row" },
      button("signup.patient", () => signUpPage("patient"), { id: "signup-patient", class: "secondary" }),
      button("signup.doctor", () => signUpPage("doctor"), { id: "signup-doctor", class: "secondary" })));
  focusHeading(main());
}

function signUpPage(role) {
  state.redraw = () => signUpPage(role);
  const phone = phoneInput();
  const password = passwordInput("new-password");
  const name = h("input", { type: "text", autocomplete: "name", required: true, maxlength: 100 });
  const extra = role === "patient"
    ? field("birth_date", "field.birth_date", h("input", { type: "date", required: true, max: new Date().toISOString().slice(0, 10) }))
    : field("license_number", "field.license_number", h("input", { type: "text", required: true, maxlength: 32, autocomplete: "off" }), "signup.licence_hint");
  const message = messageLine("signup-message");
  const submit = h("button", { type: "submit", id: "signup-submit" }, t("signup.submit"));
  const form = h("form", {
    id: "signup-form",
    onsubmit: (event) => {
      event.preventDefault();
      busy(submit, message, async () => {
        const body = { phone: phone.value, password: password.value, name: name.value };
        const value = extra.querySelector("input").value;
        if (role === "patient") body.birth_date = value;
        else body.license_number = value;
        await api("POST", role === "patient" ? "/v1/patients" : "/v1/doctors", body);
        try {
          await signIn(phone.value, password.value);
        } catch (e) {
          // The account exists: signing up again would only find the phone taken.
          signInPage(sentence(e), phone.value);
        }
      });
    },
  },
  h("h1", {}, t(`signup.title.${role}`)),
  field("name", "field.name", name),
  field("phone", "field.phone", phone),
  field("password", "field.password", password, "signup.password_hint"),
  extra,
  message,
  submit);
  show(form, h("p", { class: "alt" }, button("signup.back", () => signInPage(), { id: "signup-back", class: "link" })));
  focusHeading(main());
}

async function signOut(notice) {
  const token = state.token;
  state.token = null;
  state.role = null;
  state.subject = null;
  document.getElementById("account").replaceChildren();
  if (token) {
    // The server ends the session; the page forgets the token either way.
    await fetch("/v1/sessions/current", { method: "DELETE", headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
  }
  signInPage(notice);
}

state.onSignedOut = (sentence) => { if (state.token) signOut(sentence); };

// ---- signed in --------------------------------------------------------------------

function signedIn() {
  document.getElementById("account").replaceChildren(
    h("span", { id: "who" }, t(`role.${state.role}`)),
    button("signout.submit", () => signOut(), { id: "signout", class: "secondary" }));
  const tabs = TABS[state.role];
  if (!tabs) {
    show(h("p", { class: "message error", role: "alert" }, t("errors.no_web_role")));
    return;
  }
  openTab(tabs(), 0);
}

function openTab(tabs, index, noticeKey, keepFocus) {
  state.redraw = () => {
    document.getElementById("who").textContent = t(`role.${state.role}`);
    document.getElementById("signout").textContent = t("signout.submit");
    openTab(tabs, index, null, true);
  };
  const nav = h("nav", { "aria-label": t("app.sections") },
    h("ul", {}, tabs.map((tab, i) => h("li", {},
      h("button", {
        type: "button",
        id: `tab-${tab.id}`,
        class: "tab",
        "aria-current": i === index ? "page" : null,
        onclick: () => openTab(tabs, i),
      }, t(tab.label))))));
  const body = h("div", { id: "view" });
  // What was just done, announced on the page it leads to.
  const notice = h("p", { id: "notice", class: noticeKey ? "message notice" : "message", role: "status" }, noticeKey ? t(noticeKey) : "");
  show(h("h1", { class: "sr-only" }, t(tabs[index].label)), nav, notice, body);
  // A view may move to another tab (e.g. after a request is sent), saying why.
  const go = (id, key) => openTab(tabs, Math.max(0, tabs.findIndex((x) => x.id === id)), key);
  body.append(tabs[index].render(go));
  if (!keepFocus) focusHeading(main());
}

// ---- start ------------------------------------------------------------------------

document.getElementById("lang").addEventListener("change", async (event) => {
  try {
    await loadLanguage(event.target.value);
  } catch {
    return;
  }
  // The focus stays on the language switch.
  if (state.redraw) state.redraw();
});

async function start() {
  try {
    await loadLanguage(document.getElementById("lang").value);
  } catch {
    // Without the words there is nothing to show but this.
    show(h("p", { class: "message error", role: "alert" }, "The server cannot be reached. Check your connection and reload. / Seva haipatikani. Angalia mtandao na upakie upya."));
    return;
  }
  try {
    state.config = await api("GET", "/v1/client-config");
  } catch { /* defaults */ }
  signInPage();
}

start();
