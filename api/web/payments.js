// M-Pesa payments: the form that asks for an STK Push, its live status, and the list.

import {
  h, t, api, field, messageLine, busy, pagedList, query, line, fmtTime, every, newKey,
} from "./core.js";

const FINAL = ["confirmed", "failed", "cancelled", "timed_out"];

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

/** Asks M-Pesa to push a payment prompt to a phone, then follows it until it ends. */
export function payForm({ doctorId, accessRequestId, onDone, titleKey, phoneHintKey }) {
  const purpose = h("select", {},
    h("option", { value: "consultation_fee" }, t("payment.purpose.consultation_fee")),
    h("option", { value: "access_fee" }, t("payment.purpose.access_fee")));
  const amount = h("input", { type: "number", min: 1, max: 250000, step: 1, required: true, inputmode: "numeric" });
  const phone = h("input", { type: "tel", required: true, autocomplete: "tel", placeholder: "07XX XXX XXX" });
  const message = messageLine("pay-message");
  const live = h("p", { id: "pay-status", class: "live", role: "status", "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: "pay-submit" }, t("pay.submit"));
  // One key per payment the user means: resubmitting after an error retries the same one.
  let key = newKey();
  const form = h("form", {
    id: "pay-form", class: "panel",
    onsubmit: (event) => {
      event.preventDefault();
      busy(submit, message, async () => {
        const body = { purpose: purpose.value, amount_kes: Number(amount.value), phone: phone.value };
        if (doctorId) body.doctor_id = doctorId;
        if (accessRequestId) body.access_request_id = accessRequestId;
        const created = await api("POST", "/v1/payments", body, key);
        key = newKey();
        live.className = "live pending";
        live.textContent = t("pay.sent");
        follow(created.payment_id, live, onDone);
      });
    },
  },
  h("h2", {}, t(titleKey ?? "pay.title")),
  field("pay-purpose", "field.purpose_of_payment", purpose),
  field("pay-amount", "field.amount_kes", amount),
  field("pay-phone", "field.pay_phone", phone, phoneHintKey ?? "pay.phone_hint"),
  message, submit, live);
  return form;
}

function follow(paymentId, live, onDone) {
  let ended = false;
  const check = async () => {
    if (ended) return;
    try {
      const p = await api("GET", `/v1/payments/${paymentId}`);
      live.className = `live ${p.status}`;
      live.textContent = p.status === "pending" ? t("pay.waiting") : statusText(p);
      if (FINAL.includes(p.status)) {
        ended = true;
        if (onDone) onDone();
      }
    } catch (e) {
      live.textContent = e.message;
    }
  };
  every(2000, check);
  check();
}
