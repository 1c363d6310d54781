// The patient's pages: records and uploads, access requests and grants, the access
// log, payments and the share code.

import {
  state, h, t, api, fetchBlob, blobUrl, saveBlob, uploadFile, field, messageLine, busy,
  button, section, pagedList, query, line, badge, fmtBytes, fmtTime, fmtDate,
  CATEGORIES, categoryName, newKey, sentence, scopeText, recordLines,
} from "./core.js";
import { paymentsList, payForm } from "./payments.js";

const me = () => `/v1/patients/${state.subject}`;

export function patientTabs() {
  return [
    { id: "records", label: "patient.tab.records", render: recordsView },
    { id: "requests", label: "patient.tab.requests", render: requestsView },
    { id: "log", label: "patient.tab.log", render: logView },
    { id: "payments", label: "patient.tab.payments", render: paymentsView },
    { id: "share", label: "patient.tab.share", render: shareView },
  ];
}

// ---- records ----------------------------------------------------------------------

function recordsView() {
  const records = () => pagedList("record-list", "records.empty",
    (cursor) => api("GET", `${me()}/records${query({ cursor, limit: 20 })}`),
    recordCard);
  const list = h("div", {}, records());
  return h("div", {}, uploadForm(() => list.replaceChildren(records())), section("records", "records.title", list));
}

function recordCard(r) {
  const message = messageLine(`record-${r.record_id}-message`);
  const download = button("records.download", () => busy(download, message, async () => {
    saveBlob(await fetchBlob(`/v1/records/${r.record_id}/content`), r.filename);
  }), { class: "secondary" });
  let token = null;
  if (r.token_id) {
    const url = state.config.explorer_tx_url && r.token_tx_hash ? state.config.explorer_tx_url + r.token_tx_hash : null;
    token = url
      ? h("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, t("records.token", { id: r.token_id }))
      : t("records.token", { id: r.token_id });
  }
  return h("li", { class: "card record", "data-record": r.record_id },
    recordLines(r),
    line("records.storage", t(`storage.${r.storage_status}`)),
    line("records.chain", token ?? t("records.not_minted")),
    h("div", { class: "row" }, download),
    message);
}

function uploadForm(done) {
  const category = h("select", { required: true },
    h("option", { value: "" }, t("upload.choose")),
    CATEGORIES.map((c) => h("option", { value: c }, categoryName(c))));
  const file = h("input", { type: "file", required: true });
  const progress = h("progress", { id: "upload-progress", max: 100, value: 0, hidden: true, "aria-label": t("upload.progress") });
  const chosen = h("p", { class: "hint", id: "upload-chosen", "aria-live": "polite" });
  const message = messageLine("upload-message");
  const submit = h("button", { type: "submit", id: "upload-submit" }, t("upload.submit"));
  let dropped = null;
  // One key per chosen file: retrying the same file after an error stores it once.
  let key = newKey();
  const picked = () => dropped ?? file.files[0] ?? null;
  const describe = () => {
    key = newKey();
    const f = picked();
    chosen.textContent = f ? t("upload.chosen", { name: f.name, size: fmtBytes(f.size) }) : "";
  };
  file.addEventListener("change", () => { dropped = null; describe(); });
  const zone = h("div", {
    class: "drop", id: "upload-drop",
    ondragover: (e) => { e.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const f = e.dataTransfer?.files?.[0];
      if (f) { dropped = f; file.required = false; describe(); }
    },
  }, h("p", {}, t("upload.drop")), field("upload-file", "upload.file", file), chosen);
  const form = h("form", {
    id: "upload-form", class: "panel",
    onsubmit: (event) => {
      event.preventDefault();
      const f = picked();
      if (!f) { message.showError(t("upload.none")); return; }
      if (state.config.max_upload_bytes && f.size > state.config.max_upload_bytes) {
        message.showError(t("errors.body_too_large"));
        return;
      }
      busy(submit, message, async () => {
        progress.hidden = false;
        progress.value = 0;
        const path = `${me()}/records${query({ category: category.value, filename: f.name })}`;
        await uploadFile(path, f, key, (share) => { progress.value = Math.round(share * 100); });
        progress.value = 100;
        message.showNotice(t("upload.done", { name: f.name }));
        form.reset();
        dropped = null;
        file.required = true;
        chosen.textContent = "";
        done();
      });
    },
  },
  h("h2", {}, t("upload.title")),
  field("upload-category", "records.category", category),
  zone, progress, message, submit);
  return form;
}

// ---- access requests and grants ---------------------------------------------------

function doctorLine(r) {
  return h("p", { class: "doctor" },
    h("strong", {}, r.doctor_name || t("doctor.unknown")), " ",
    t("doctor.licence", { licence: r.doctor_licence ?? "" }), " ",
    r.doctor_verified ? badge("doctor.verified", "ok") : badge("doctor.unverified", "warn"));
}

function requestsView(go) {
  return h("div", {},
    section("pending", "requests.pending",
      pagedList("pending-list", "requests.none_pending",
        (cursor) => api("GET", `${me()}/access-requests${query({ status: "pending", cursor })}`),
        (r) => pendingCard(r, go))),
    section("grants", "grants.title",
      pagedList("grant-list", "grants.none",
        (cursor) => api("GET", `${me()}/access-requests${query({ status: "approved", cursor })}`),
        (r) => grantCard(r, go))));
}

/** The latest expiry the patient may give: now plus the requested days. */
function latestExpiry(r) {
  return new Date(Date.now() + r.duration_days * 86400000);
}

/** `YYYY-MM-DD` of a moment, in Nairobi (what a date input shows and takes). */
function nairobiDay(date) {
  return date.toLocaleDateString("en-CA", { timeZone: "Africa/Nairobi" });
}

function pendingCard(r, go) {
  const message = messageLine(`request-${r.request_id}-message`);
  const boxes = [
    ...r.categories.map((c) => ({ kind: "categories", value: c, label: categoryName(c) })),
    ...r.record_ids.map((id, i) => ({ kind: "record_ids", value: id, label: t("scope.record_n", { n: i + 1 }) })),
  ].map((item, i) => {
    const input = h("input", { type: "checkbox", id: `scope-${r.request_id}-${i}`, checked: true, value: item.value });
    item.input = input;
    return item;
  });
  const latest = latestExpiry(r);
  const lastDay = nairobiDay(latest);
  const expiry = h("input", { type: "date", min: nairobiDay(new Date()), max: lastDay, value: lastDay });
  const reason = h("input", { type: "text", maxlength: 1000 });
  const approve = button("requests.approve", () => busy([approve, reject], message, async () => {
    const body = {};
    for (const kind of ["categories", "record_ids"]) {
      const all = boxes.filter((b) => b.kind === kind);
      const kept = all.filter((b) => b.input.checked).map((b) => b.value);
      if (kept.length < all.length) body[kind] = kept;
    }
    if (expiry.value && expiry.value !== lastDay) {
      // The end of the chosen day in Nairobi, never later than asked for.
      const end = new Date(`${expiry.value}T23:59:59+03:00`);
      body.expires_at = new Date(Math.min(end.getTime(), latest.getTime() - 60000)).toISOString();
    }
    await api("POST", `/v1/access-requests/${r.request_id}/approval`, body, newKey());
    go("requests", "requests.approved");
  }), { class: "approve" });
  const reject = button("requests.reject", () => busy([approve, reject], message, async () => {
    await api("POST", `/v1/access-requests/${r.request_id}/rejection`, reason.value ? { reason: reason.value } : {}, newKey());
    go("requests", "requests.rejected");
  }), { class: "danger reject" });
  return h("li", { class: "card request", "data-request": r.request_id },
    doctorLine(r),
    line("requests.purpose", r.purpose ?? ""),
    line("requests.scope", scopeText(r)),
    line("requests.duration", t("requests.days", { n: r.duration_days })),
    line("requests.asked", fmtTime(r.requested_at)),
    h("fieldset", {}, h("legend", {}, t("requests.narrow")),
      boxes.map((b) => h("div", { class: "check" }, b.input, h("label", { for: b.input.id }, b.label)))),
    field(`expiry-${r.request_id}`, "requests.until", expiry),
    field(`reason-${r.request_id}`, "requests.reason", reason),
    h("div", { class: "row" }, approve, reject),
    message);
}

function grantCard(r, go) {
  const message = messageLine(`grant-${r.request_id}-message`);
  const actions = h("div", { class: "row" });
  const ask = (focus) => { actions.replaceChildren(revoke); if (focus) revoke.focus(); };
  const revoke = button("grants.revoke", () => {
    const yes = button("grants.confirm", () => busy(yes, message, async () => {
      await api("POST", `/v1/access-requests/${r.request_id}/revocation`, {}, newKey());
      go("requests", "grants.revoked");
    }), { class: "danger confirm-revoke" });
    actions.replaceChildren(h("span", {}, t("grants.sure")), yes, button("app.cancel", () => ask(true), { class: "secondary" }));
    yes.focus();
  }, { class: "danger revoke" });
  ask(false);
  return h("li", { class: "card grant", "data-request": r.request_id },
    doctorLine(r),
    line("requests.scope", scopeText(r)),
    line("grants.until", fmtTime(r.expires_at)),
    actions, message);
}

// ---- access log -------------------------------------------------------------------

function logView() {
  const names = new Map();
  // Record names for the log's lines (the patient's own list, first page of 100).
  const named = api("GET", `${me()}/records${query({ limit: 100 })}`)
    .then((page) => { for (const r of page.items) names.set(r.record_id, r.filename || categoryName(r.category)); })
    .catch(() => {});
  return section("log", "log.title", h("p", { class: "hint" }, t("log.hint")),
    pagedList("log-list", "log.empty",
      async (cursor) => { await named; return api("GET", `${me()}/access-log${query({ cursor })}`); },
      (e) => {
        const record = names.get(e.record_id) ?? categoryName(e.category);
        return h("li", { class: "card read" },
          h("p", {}, e.doctor_id
            ? t("log.line", { who: e.doctor_name || t("doctor.unknown"), record })
            : t("log.line_you", { record })),
          line("log.when", fmtTime(e.at)),
          line("records.category", categoryName(e.category)));
      }));
}

// ---- payments ---------------------------------------------------------------------

function paymentsView() {
  const list = h("div", {}, paymentsList(`${me()}/payments`));
  const refresh = () => list.replaceChildren(paymentsList(`${me()}/payments`));
  const form = h("div", {}, state.config.payments ? null : h("p", { class: "hint" }, t("pay.off")));
  if (state.config.payments) {
    // The doctors the patient has granted access, to pay one of them.
    api("GET", `${me()}/access-requests${query({ status: "approved", limit: 100 })}`)
      .then((page) => page.items)
      .catch(() => [])
      .then((grants) => form.replaceChildren(payForm({
        onDone: refresh,
        parties: grants.map((g) => ({
          label: `${g.doctor_name || t("doctor.unknown")} (${t("doctor.licence", { licence: g.doctor_licence ?? "" })})`,
          doctorId: g.doctor_id,
          accessRequestId: g.request_id,
        })),
      })));
  }
  return h("div", {}, form, section("payments", "payments.title", list));
}

// ---- share code -------------------------------------------------------------------

function shareView() {
  const holder = h("div", { id: "share-code-box" });
  const message = messageLine("share-message");
  const renew = button("share.new", () => busy(renew, message, async () => {
    // The answer is the new code: only its QR code remains to fetch.
    await load(await api("POST", `${me()}/share-code`, undefined, newKey()));
  }), { id: "share-new" });
  async function load(issued) {
    try {
      const code = issued ?? await api("GET", `${me()}/share-code`);
      const qr = await fetchBlob(`${me()}/share-code/qr`);
      holder.replaceChildren(
        h("p", { class: "code", id: "share-code" }, code.code),
        h("p", {}, t("share.until", { date: fmtDate(code.expires_at) })),
        h("img", { src: blobUrl(qr), alt: t("share.qr_alt", { code: code.code }), width: 200, height: 200, class: "qr" }));
    } catch (e) {
      if (e.status === 404) holder.replaceChildren(h("p", {}, t("share.none")));
      else message.showError(sentence(e));
    }
  }
  load();
  return section("share", "share.title", h("p", { class: "hint" }, t("share.hint")), holder, message, renew);
}
