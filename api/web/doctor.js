// The doctor's pages: find a patient by share code and ask for access, follow the
// requests, open what was granted, and ask for fees by M-Pesa.

import {
  state, h, t, api, fetchBlob, saveBlob, field, messageLine, busy, button, section,
  pagedList, query, line, fmtTime, CATEGORIES, categoryName, newKey, scopeText, recordLines,
  focusHeading,
} from "./core.js";
import { paymentsList, payForm } from "./payments.js";

const me = () => `/v1/doctors/${state.subject}`;

export function doctorTabs() {
  return [
    { id: "find", label: "doctor.tab.find", render: findView },
    { id: "requests", label: "doctor.tab.requests", render: requestsView },
    { id: "payments", label: "doctor.tab.payments", render: paymentsView },
  ];
}

// ---- find a patient and ask ---------------------------------------------------------

function findView(go) {
  const code = h("input", { type: "text", required: true, autocomplete: "off", autocapitalize: "characters", spellcheck: "false", maxlength: 20, placeholder: "XXXXX-XXXXX" });
  const message = messageLine("find-message");
  const found = h("div", { id: "found" });
  const submit = h("button", { type: "submit", id: "find-submit" }, t("find.submit"));
  const form = h("form", {
    id: "find-form", class: "panel",
    onsubmit: (event) => {
      event.preventDefault();
      busy(submit, message, async () => {
        found.replaceChildren();
        const typed = code.value.trim();
        if (!typed) { message.showError(t("find.empty")); return; }
        const patient = await api("GET", `/v1/share-codes/${encodeURIComponent(typed)}`);
        found.replaceChildren(requestForm(patient.patient_id, go));
        focusHeading(found);
      });
    },
  },
  h("h2", {}, t("find.title")),
  field("share-code-input", "find.code", code, "find.hint"),
  message, submit);
  return h("div", {}, form, found);
}

function requestForm(patientId, go) {
  const boxes = CATEGORIES.map((c) => h("input", { type: "checkbox", id: `ask-${c}`, value: c }));
  const purpose = h("textarea", { required: true, maxlength: 500, rows: 3 });
  const days = h("input", { type: "number", min: 1, max: 365, value: 30, required: true, inputmode: "numeric" });
  const note = h("input", { type: "text", maxlength: 1000 });
  const message = messageLine("ask-message");
  const submit = h("button", { type: "submit", id: "ask-submit" }, t("ask.submit"));
  return h("form", {
    id: "ask-form", class: "panel",
    onsubmit: (event) => {
      event.preventDefault();
      const categories = boxes.filter((b) => b.checked).map((b) => b.value);
      if (!categories.length) { message.showError(t("ask.no_category")); return; }
      busy(submit, message, async () => {
        const body = { patient_id: patientId, categories, purpose: purpose.value, duration_days: Number(days.value) };
        if (note.value) body.note = note.value;
        await api("POST", "/v1/access-requests", body, newKey());
        go("requests", "ask.sent");
      });
    },
  },
  h("h2", {}, t("ask.title")),
  h("p", { class: "notice" }, t("ask.found")),
  h("fieldset", {}, h("legend", {}, t("ask.categories")),
    boxes.map((b) => h("div", { class: "check" }, b, h("label", { for: b.id }, categoryName(b.value))))),
  field("ask-purpose", "ask.purpose", purpose, "ask.purpose_hint"),
  field("ask-days", "ask.days", days),
  field("ask-note", "ask.note", note),
  message, submit);
}

// ---- my requests and what they open ---------------------------------------------------

function requestsView() {
  return section("my-requests", "doctor.requests.title",
    pagedList("my-request-list", "doctor.requests.empty",
      (cursor) => api("GET", `${me()}/access-requests${query({ cursor })}`),
      requestCard));
}

function requestCard(r) {
  const records = h("div", { class: "granted" });
  const message = messageLine(`mine-${r.request_id}-message`);
  const open = r.status === "approved"
    ? button("doctor.open", () => records.replaceChildren(grantedRecords(r)), { class: "open-records" })
    : null;
  const fee = r.status === "approved" && state.config.payments
    ? button("doctor.ask_fee", () => {
      // The fee is asked under this request, of its patient, on their registered phone.
      records.replaceChildren(payForm({ id: `pay-${r.request_id}`, accessRequestId: r.request_id, doctorId: state.subject, titleKey: "doctor.fee_title", phoneHintKey: "doctor.fee_phone_hint" }));
    }, { class: "secondary ask-fee" })
    : null;
  return h("li", { class: `card mine ${r.status}`, "data-request": r.request_id },
    h("h3", {}, t(`request.status.${r.status}`)),
    line("doctor.patient_ref", r.patient_id.slice(0, 8)),
    line("requests.scope", scopeText(r)),
    line("requests.asked", fmtTime(r.requested_at)),
    r.expires_at ? line("grants.until", fmtTime(r.expires_at)) : null,
    h("div", { class: "row" }, open, fee),
    message, records);
}

/** The records this grant covers (the patient's list shows what any of the doctor's
 *  grants covers; each read names this one). */
function grantedRecords(r) {
  const covered = (rec) => r.categories.includes(rec.category) || r.record_ids.includes(rec.record_id);
  return pagedList(`granted-${r.request_id}`, "doctor.granted.empty",
    (cursor) => api("GET", `/v1/patients/${r.patient_id}/records${query({ cursor })}`),
    (rec) => {
      const message = messageLine(`read-${r.request_id}-${rec.record_id}-message`);
      const download = button("records.download", () => busy(download, message, async () => {
        const blob = await fetchBlob(`/v1/records/${rec.record_id}/content${query({ request_id: r.request_id })}`);
        saveBlob(blob, rec.filename);
        message.showNotice(t("doctor.downloaded"));
      }), { class: "download" });
      return h("li", { class: "card record", "data-record": rec.record_id },
        recordLines(rec),
        h("div", { class: "row" }, download), message);
    },
    covered);
}

// ---- payments ---------------------------------------------------------------------

function paymentsView() {
  // A fee is asked only under an approved request (its card has the form), never of
  // a number typed here.
  return h("div", {},
    h("p", { class: "hint", id: "fee-where" }, t(state.config.payments ? "doctor.fee_from_requests" : "pay.off")),
    section("payments", "payments.title", paymentsList(`${me()}/payments`)));
}
