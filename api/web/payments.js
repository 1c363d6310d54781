// M-Pesa payments: the form that asks for an STK Push, its live status, and the list.

import {
  h, t, api, field, messageLine, busy, pagedList, query, line, fmtTime, later, newKey,
  sentence, button,
} from "./core.js";

const FINAL = ["confirmed", "failed", "cancelled", "timed_out"];

/** How long the page follows a payment before it asks the user to check again. */
const FOLLOW_MS = 3 * 60 * 1000;

function statusText(p) {
  const text = t(`payment.status.${p.status}`);
  return p.mpesa_receipt ? `${text} (${t("payment.receipt", { receipt: p.mpesa_receipt })})` : text;
}

export function paymentsList(path) {
  return pagedList("payment-list", "payments.empty",
    (cursor) => api("GET", `${path}${query({ cursor })}`),
    (p) => h("li", { class: `card payment ${p.status}`, "data-payment": p.payment_id },
      h("h3", {}, t(`payment.purpose.${p.purpose}`), " · ", t("payment.amount", { amount: p.amount_kes })),
      line("payment.status", statusText(p)),
      line("payment.asked", fmtTime(p.requested_at)),
      p.settled_at ? line("payment.settled", fmtTime(p.settled_at)) : null));
}

/** Asks M-Pesa to push a payment prompt, then follows it until it ends. The prompt
 *  always goes to the patient's registered phone (the server allows no other), so
 *  the form asks for no number and says where it goes (`phoneHintKey`).
 *  `id` keeps the form's ids unique when several are on the page; `parties`, if given,
 *  is a list of `{label, doctorId, accessRequestId}` the payer chooses from. */
export function payForm({ id = "pay", doctorId, accessRequestId, parties, onDone, titleKey, phoneHintKey }) {
  const purpose = h("select", { class: "pay-purpose" },
    h("option", { value: "consultation_fee" }, t("payment.purpose.consultation_fee")),
    h("option", { value: "access_fee" }, t("payment.purpose.access_fee")));
  const amount = h("input", { type: "number", min: 1, max: 250000, step: 1, required: true, inputmode: "numeric", class: "pay-amount" });
  const party = parties && parties.length
    ? h("select", { class: "pay-party" },
      h("option", { value: "" }, t("pay.no_doctor")),
      parties.map((p, i) => h("option", { value: String(i) }, p.label)))
    : null;
  const message = messageLine(`${id}-message`);
  const live = h("p", { id: `${id}-status`, class: "live pay-status", role: "status", "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: `${id}-submit`, class: "pay-submit" }, t("pay.submit"));
  // One key per payment the user means: a resubmission after an error retries the same
  // payment, and any change to the form makes it another one.
  let key = newKey();
  const form = h("form", {
    id: `${id}-form`, class: "panel pay-form",
    oninput: () => { key = newKey(); },
    onsubmit: (event) => {
      event.preventDefault();
      busy(submit, message, async () => {
        const body = { purpose: purpose.value, amount_kes: Number(amount.value) };
        const chosen = party && party.value !== "" ? parties[Number(party.value)] : null;
        const doctor = chosen?.doctorId ?? doctorId;
        const request = chosen?.accessRequestId ?? accessRequestId;
        if (doctor) body.doctor_id = doctor;
        if (request) body.access_request_id = request;
        const created = await api("POST", "/v1/payments", body, key);
        key = newKey();
        live.className = "live pay-status pending";
        live.textContent = t("pay.sent");
        // No second prompt while this one waits for the PIN.
        submit.hidden = true;
        follow(created.payment_id, live, () => {
          submit.hidden = false;
          if (onDone) onDone();
        });
      });
    },
  },
  h("h2", {}, t(titleKey ?? "pay.title")),
  party ? field(`${id}-party`, "field.doctor_id", party) : null,
  field(`${id}-purpose`, "field.purpose_of_payment", purpose),
  field(`${id}-amount`, "field.amount_kes", amount),
  h("p", { id: `${id}-phone-hint`, class: "hint pay-phone-hint" }, t(phoneHintKey ?? "pay.phone_hint")),
  message, submit, live);
  return form;
}

/** Asks for the payment's state, each time after the last answer, less often as time
 *  goes on; after a few minutes, stops and offers to check again. */
function follow(paymentId, live, ended) {
  const started = Date.now();
  let pause = 1000;
  const check = async () => {
    try {
      const p = await api("GET", `/v1/payments/${paymentId}`);
      live.className = `live pay-status ${p.status}`;
      live.textContent = p.status === "pending" ? t("pay.waiting") : statusText(p);
      if (FINAL.includes(p.status)) { ended(); return; }
    } catch (e) {
      live.textContent = sentence(e);
    }
    if (Date.now() - started > FOLLOW_MS) {
      live.replaceChildren(t("pay.still_waiting"), " ",
        button("pay.check", () => { live.textContent = t("pay.waiting"); follow(paymentId, live, ended); }, { class: "link" }));
      return;
    }
    pause = Math.min(pause * 1.5, 10000);
    later(pause, check);
  };
  check();
}
