// Staff pages: the registrar's verification queue, and the auditor's history,
// disclosures, export and chain check.

import {
  h, t, api, fetchBlob, saveBlob, field, messageLine, busy, button, section, pagedList,
  query, line, fmtTime, categoryName, newKey,
} from "./core.js";

// ---- registrar --------------------------------------------------------------------

export function registrarTabs() {
  return [
    { id: "queue", label: "registrar.tab.queue", render: (go) => doctorsView("unverified", go) },
    { id: "verified", label: "registrar.tab.verified", render: (go) => doctorsView("verified", go) },
  ];
}

function doctorsView(status, go) {
  return section("doctors", status === "unverified" ? "registrar.queue" : "registrar.verified",
    pagedList("doctor-list", status === "unverified" ? "registrar.queue_empty" : "registrar.none",
      (cursor) => api("GET", `/v1/doctors${query({ status, cursor })}`),
      (d) => {
        const message = messageLine(`doctor-${d.doctor_id}-message`);
        const verify = status === "unverified"
          ? button("registrar.verify", () => busy(verify, message, async () => {
            await api("POST", `/v1/doctors/${d.doctor_id}/verification`, undefined, newKey());
            go("queue", "registrar.verified_one");
          }), { class: "verify" })
          : null;
        return h("li", { class: "card doctor-item", "data-doctor": d.doctor_id },
          h("h3", {}, d.name || t("doctor.unknown")),
          line("registrar.licence", d.licence),
          line("registrar.registered", fmtTime(d.registered_at)),
          h("div", { class: "row" }, verify), message);
      }));
}

// ---- auditor ----------------------------------------------------------------------

export function auditorTabs() {
  return [
    { id: "history", label: "auditor.tab.history", render: historyView },
    { id: "disclosures", label: "auditor.tab.disclosures", render: disclosuresView },
    { id: "verify", label: "auditor.tab.verify", render: verifyView },
  ];
}

/** A date input's day as the start or end of that day in Nairobi. */
function dayBound(value, end) {
  return value ? new Date(`${value}T${end ? "23:59:59.999" : "00:00:00"}+03:00`).toISOString() : "";
}

function historyView() {
  const type = h("input", { type: "text", autocomplete: "off", placeholder: "AccessRequested" });
  const actor = h("input", { type: "text", autocomplete: "off", placeholder: "doctor:…" });
  const aggregate = h("input", { type: "text", autocomplete: "off" });
  const from = h("input", { type: "date" });
  const to = h("input", { type: "date" });
  const message = messageLine("history-message");
  const results = h("div", { id: "history-results" });
  const filters = () => ({
    event_type: type.value.trim(), actor: actor.value.trim(), aggregate_id: aggregate.value.trim(),
    from_time: dayBound(from.value, false), to_time: dayBound(to.value, true),
  });
  const search = h("button", { type: "submit", id: "history-submit" }, t("auditor.search"));
  const exportButton = button("auditor.export", () => busy(exportButton, message, async () => {
    const blob = await fetchBlob(`/v1/audit/events/export${query(filters())}`);
    saveBlob(blob, "afyachain-audit.ndjson");
    message.showNotice(t("auditor.exported"));
  }), { id: "history-export", class: "secondary" });
  const run = () => results.replaceChildren(pagedList("history-list", "auditor.no_events",
    (cursor) => api("GET", `/v1/audit/events${query({ ...filters(), cursor })}`),
    (e) => h("li", { class: "card event" },
      h("h3", {}, `#${e.position} ${e.event_type}`),
      line("auditor.when", fmtTime(e.recorded_at)),
      line("auditor.actor", e.actor),
      line("auditor.aggregate", `${e.aggregate_type} ${e.aggregate_id}`),
      h("p", { class: "hash" }, h("code", {}, e.hash)))));
  const form = h("form", {
    id: "history-form", class: "panel filters",
    onsubmit: (event) => { event.preventDefault(); message.clear(); run(); },
  },
  h("h2", {}, t("auditor.history")),
  field("filter-type", "auditor.event_type", type),
  field("filter-actor", "auditor.actor", actor, "auditor.actor_hint"),
  field("filter-aggregate", "auditor.aggregate_id", aggregate),
  h("div", { class: "row" }, field("filter-from", "auditor.from", from), field("filter-to", "auditor.to", to)),
  message,
  h("div", { class: "row" }, search, exportButton));
  run();
  return h("div", {}, form, results);
}

function disclosuresView() {
  const patient = h("input", { type: "text", required: true, autocomplete: "off", placeholder: "00000000-0000-0000-0000-000000000000" });
  const message = messageLine("disclosures-message");
  const results = h("div", { id: "disclosure-results" });
  const submit = h("button", { type: "submit", id: "disclosures-submit" }, t("auditor.show"));
  const form = h("form", {
    id: "disclosures-form", class: "panel",
    onsubmit: (event) => {
      event.preventDefault();
      message.clear();
      const id = patient.value.trim();
      results.replaceChildren(pagedList("disclosure-list", "auditor.no_disclosures",
        (cursor) => api("GET", `/v1/audit/patients/${encodeURIComponent(id)}/disclosures${query({ cursor })}`),
        (d) => h("li", { class: "card disclosure" },
          h("h3", {}, t("doctor.licence", { licence: d.doctor_licence ?? "?" })),
          line("records.category", categoryName(d.category)),
          line("requests.purpose", d.purpose ?? ""),
          line("auditor.when", fmtTime(d.at)),
          line("auditor.record", d.record_id))));
    },
  },
  h("h2", {}, t("auditor.disclosures")),
  field("disclosure-patient", "auditor.patient_id", patient),
  message, submit);
  return h("div", {}, form, results);
}

function verifyView() {
  const message = messageLine("verify-message");
  const report = h("div", { id: "verify-report" });
  const check = button("auditor.verify", () => busy(check, message, async () => {
    const r = await api("GET", "/v1/audit/verify");
    report.replaceChildren(
      h("p", { class: r.intact ? "notice ok" : "message error" },
        t(r.intact ? "auditor.intact" : "auditor.broken", { checked: r.checked, problems: r.problems_total })),
      h("ul", { class: "cards" }, r.problems.map((p) => h("li", { class: "card" },
        line("auditor.problem", p.problem), line("auditor.position", String(p.position))))));
  }), { id: "verify-run" });
  return section("verify", "auditor.verify_title", h("p", { class: "hint" }, t("auditor.verify_hint")), check, message, report);
}
