//! The web app in a real browser (headless Chromium): the whole consent story through
//! the pages, a fee paid through the local Daraja sandbox, the language switch, and a
//! doctor whose name is an XSS attempt. Two browsers, so the patient and the doctor are
//! on their pages at the same time. Screenshots go to `tests/screenshots/`.

use std::time::Duration;

use eventstore::Backend;
use serde_json::{json, Value};

use crate::app::{password_of, TestApp};
use crate::browser::Browser;
use crate::payments::{free_port, sandbox, vars};

const PHONE: u32 = 360;
const DESKTOP: u32 = 1280;

/// A name that would run script if the page ever parsed it as HTML.
const XSS_NAME: &str =
    r#"Dr Amina <script>window.__xss=1</script><img src=x onerror="window.__xss=2">"#;

async fn sign_in(b: &Browser, phone: &str) {
    b.wait_for("#signin-form").await;
    b.fill("#phone", phone).await;
    b.fill("#password", &password_of(phone)).await;
    b.click("#signin-submit").await;
    b.wait_for("#signout").await;
}

async fn sign_out(b: &Browser) {
    b.click("#signout").await;
    b.wait_for("#signin-form").await;
    // Nothing of the session is left in the page.
    let account = b
        .execute(
            "return document.getElementById('account').textContent",
            vec![],
        )
        .await;
    assert_eq!(account, "");
}

/// Both sizes of the page on screen.
async fn shots(b: &Browser, name: &str, take: bool) {
    every_control_is_labelled(b).await;
    if !take {
        return;
    }
    for width in [PHONE, DESKTOP] {
        b.set_width(width).await;
        b.screenshot_full(&format!("{name}-{width}")).await;
    }
    b.set_width(PHONE).await;
}

/// No script ran from the name, and nothing the name holds became an element.
async fn no_xss(b: &Browser) {
    let found = b
        .execute(
            "return [window.__xss === undefined, document.querySelectorAll('script').length, \
             document.querySelectorAll('main img[src=\"x\"]').length]",
            vec![],
        )
        .await;
    assert_eq!(
        found,
        serde_json::json!([true, 1, 0]),
        "the name was parsed as HTML"
    );
}

/// Whose session `token` is: the subject's id.
async fn subject_id(app: &TestApp, token: &str) -> String {
    app.get("/v1/sessions/current", Some(token)).await.ok(200)["subject_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Every form control on screen has a label (or an aria-label).
async fn every_control_is_labelled(b: &Browser) {
    let unlabelled = b
        .execute(
            "return Array.from(document.querySelectorAll('input, select, textarea'))\
             .filter(e => e.type !== 'hidden' && !e.getAttribute('aria-label') \
               && !(e.id && document.querySelector(`label[for=\"${e.id}\"]`)))\
             .map(e => e.id || e.name || e.type)",
            vec![],
        )
        .await;
    assert_eq!(unlabelled, json!([]), "controls without a label");
}

/// Sends keys to whatever has the focus, as a keyboard would.
async fn press(b: &Browser, keys: &str) {
    let focused = b.client().active_element().await.unwrap();
    focused.send_keys(keys).await.unwrap();
}

async fn focused_id(b: &Browser) -> String {
    b.execute(
        "return document.activeElement ? document.activeElement.id : ''",
        vec![],
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Tabs forward until the element with `id` has the focus.
async fn tab_to(b: &Browser, id: &str) {
    for _ in 0..20 {
        if focused_id(b).await == id {
            return;
        }
        press(b, TAB).await;
    }
    panic!("the keyboard never reached #{id}");
}

const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

#[actix_rt::test]
async fn the_consent_story_runs_through_the_pages_on_sqlite() {
    story(Backend::Sqlite).await;
}

#[actix_rt::test]
async fn the_consent_story_runs_through_the_pages_on_postgres() {
    story(Backend::Postgres).await;
}

async fn story(backend: Backend) {
    let daraja = sandbox(300).await;
    let port = free_port();
    let vars = vars(&daraja, port, 60);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let Some(app) = TestApp::start_with(backend, &refs).await else {
        return;
    };
    let shots_here = backend == Backend::Sqlite;
    let Some(p) = Browser::start().await else {
        app.stop().await;
        return;
    };
    let d = Browser::start().await.expect("a second browser");
    let url = app.server.url("/");
    for b in [&p, &d] {
        b.set_width(PHONE).await;
        b.goto(&url).await;
    }

    // The sign-in page, in both sizes.
    p.wait_for("#signin-form").await;
    shots(&p, "signin", shots_here).await;

    // A patient signs up through the page.
    let patient_phone = app.phone();
    p.click("#signup-patient").await;
    p.fill("#name", "Achieng Otieno").await;
    p.fill("#phone", &patient_phone).await;
    p.fill("#password", &password_of(&patient_phone)).await;
    p.execute(
        "document.getElementById('birth_date').value = '1990-04-12'",
        vec![],
    )
    .await;
    p.click("#signup-submit").await;
    p.wait_text("#who", "Patient").await;

    // Uploads a record, by the file picker.
    let content: Vec<u8> = (0..40_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let dir = std::env::temp_dir().join(format!("afya-pages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hba1c-2026.pdf");
    std::fs::write(&file, &content).unwrap();
    p.select("#upload-category", "lab").await;
    p.upload("#upload-file", &file).await;
    p.wait_text("#upload-chosen", "hba1c-2026.pdf").await;
    p.click("#upload-submit").await;
    p.wait_text(".record h3", "hba1c-2026.pdf").await;
    p.wait_text("#upload-message", "was encrypted and saved")
        .await;
    p.wait_text(".record", "Lab result").await;
    // The progress bar stays full once the upload is done.
    assert_eq!(
        p.execute(
            "return document.getElementById('upload-progress').value",
            vec![]
        )
        .await,
        100
    );
    p.wait_for("#upload-progress").await;

    // A second record, dropped on the page rather than picked.
    p.select("#upload-category", "other").await;
    p.execute(
        "const dt = new DataTransfer();\
         dt.items.add(new File(['penicillin'], 'allergies.txt', { type: 'text/plain' }));\
         document.getElementById('upload-drop').dispatchEvent(\
           new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));",
        vec![],
    )
    .await;
    p.wait_text("#upload-chosen", "allergies.txt").await;
    p.click("#upload-submit").await;
    p.wait_text(".record h3", "allergies.txt").await;

    // Makes a share code.
    p.click("#tab-share").await;
    p.wait_text("#share-code-box", "no code").await;
    p.click("#share-new").await;
    let code = p.wait_for("#share-code").await.text().await.unwrap();
    assert_eq!(code.len(), 11, "{code}");
    p.wait_for("img.qr").await;
    shots(&p, "patient-share-code", shots_here).await;

    // A doctor signs up, with a name that tries to run script.
    let doctor_phone = app.phone();
    d.click("#signup-doctor").await;
    d.fill("#name", XSS_NAME).await;
    d.fill("#phone", &doctor_phone).await;
    d.fill("#password", &password_of(&doctor_phone)).await;
    d.fill("#license_number", "KMPDC-0099").await;
    d.click("#signup-submit").await;
    d.wait_text("#who", "Doctor").await;
    // Not verified yet: the search is refused in plain words.
    d.fill("#share-code-input", &code).await;
    d.click("#find-submit").await;
    d.wait_text("#find-message", "has not been verified yet")
        .await;
    sign_out(&d).await;

    // The registrar verifies the doctor; the name shows as text.
    let registrar_phone = app.phone();
    app.add_staff("registrar", &registrar_phone, "Rehema Registrar");
    // Signed in with the keyboard only.
    tab_to(&d, "phone").await;
    press(&d, &registrar_phone).await;
    press(&d, TAB).await;
    press(&d, &password_of(&registrar_phone)).await;
    press(&d, ENTER).await;
    d.wait_for("#signout").await;
    d.wait_text(".doctor-item h3", "<script>window.__xss=1</script>")
        .await;
    no_xss(&d).await;
    shots(&d, "registrar-queue", shots_here).await;
    d.click(".doctor-item .verify").await;
    d.wait_text("#doctor-list-message", "No doctor is waiting")
        .await;
    sign_out(&d).await;

    // The doctor finds the patient by the share code (typed loosely) and asks.
    sign_in(&d, &doctor_phone).await;
    d.fill("#share-code-input", &code.to_lowercase().replace('-', " "))
        .await;
    d.click("#find-submit").await;
    d.wait_for("#ask-form").await;
    d.click("#ask-lab").await;
    d.click("#ask-other").await;
    d.fill("#ask-purpose", "Diabetes follow-up").await;
    d.fill("#ask-days", "30").await;
    shots(&d, "doctor-find", shots_here).await;
    d.click("#ask-submit").await;
    d.wait_text("#notice", "Request sent").await;
    d.wait_text(".mine h3", "Waiting for the patient").await;

    // The patient sees who asks, and why, and approves. The tab is reached by keyboard.
    tab_to(&p, "tab-requests").await;
    press(&p, ENTER).await;
    p.wait_text(".request .doctor", "KMPDC-0099").await;
    p.wait_text(".request .doctor", "Verified").await;
    p.wait_text(".request", "Diabetes follow-up").await;
    p.wait_text(".request .doctor", "<img src=x").await;
    no_xss(&p).await;
    shots(&p, "patient-requests", shots_here).await;
    // Approves less than asked: lab results only, until an earlier day.
    p.wait_text(".request", "Lab result, Other").await;
    p.click_text(".request fieldset label", "Other").await;
    let until =
        (chrono::Utc::now() + chrono::Duration::hours(3)).date_naive() + chrono::Days::new(10);
    p.execute(
        "document.querySelector('.request input[type=date]').value = arguments[0]",
        vec![json!(until.to_string())],
    )
    .await;
    p.click(".request .approve").await;
    p.wait_text("#notice", "Approved").await;
    p.wait_text(".grant", "Lab result").await;
    assert!(!p.text(".grant").await.contains("Other"));
    let doctor_token = app.sign_in(&doctor_phone).await;
    let requests = app
        .get(
            &format!(
                "/v1/doctors/{}/access-requests",
                subject_id(&app, &doctor_token).await
            ),
            Some(&doctor_token),
        )
        .await
        .ok(200);
    let grant = &requests["items"][0];
    assert_eq!(grant["categories"], json!(["lab"]));
    // The end of the chosen day in Nairobi.
    assert!(
        grant["expires_at"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{until}T20:59:59")),
        "{grant}"
    );
    p.wait_text("#pending-list-message", "No one is asking")
        .await;

    // The doctor opens the granted records and downloads the same bytes.
    d.click("#tab-requests").await;
    d.wait_text(".mine h3", "Approved").await;
    d.click(".mine .open-records").await;
    d.wait_text(".granted .record h3", "hba1c-2026.pdf").await;
    // Only what the patient granted: the lab result, not the other record.
    assert!(!d.text(".granted").await.contains("allergies.txt"));
    d.click(".granted .record .download").await;
    let downloaded = d
        .downloaded(Some("hba1c-2026.pdf"), Duration::from_secs(20))
        .await;
    assert!(
        downloaded == content,
        "the doctor got other bytes ({} of {})",
        downloaded.len(),
        content.len()
    );
    d.wait_text(
        ".granted .record",
        "This read is in the patient's access log",
    )
    .await;
    shots(&d, "doctor-records", shots_here).await;

    // The doctor asks for a consultation fee: M-Pesa prompts the patient's registered
    // phone (the form has no number to type), and the page follows the payment until
    // the sandbox's callback confirms it.
    d.click(".mine .ask-fee").await;
    d.wait_text(".mine .pay-phone-hint", "patient's registered phone")
        .await;
    d.fill(".mine .pay-amount", "500").await;
    d.click(".mine .pay-submit").await;
    d.wait_text(".mine .pay-status", "Paid").await;
    d.wait_text(".mine .pay-status", "receipt").await;
    let pushed: Vec<String> = daraja.pushes().into_iter().map(|p| p.phone).collect();
    assert_eq!(pushed, vec![patient_phone.clone()]);
    shots(&d, "doctor-fee", shots_here).await;

    // The patient sees the read in the access log, and the fee among the payments.
    p.click("#tab-log").await;
    p.wait_text(".read", "Dr Amina").await;
    p.wait_text(".read", "hba1c-2026.pdf").await;
    no_xss(&p).await;
    shots(&p, "patient-access-log", shots_here).await;
    p.click("#tab-payments").await;
    p.wait_text(".payment", "Consultation fee").await;
    p.wait_text(".payment", "Paid").await;

    // The patient's dashboard, in both sizes.
    p.click("#tab-records").await;
    p.wait_text(".record h3", "hba1c-2026.pdf").await;
    shots(&p, "patient-records", shots_here).await;

    // The doctor has the records open again when the patient revokes.
    d.click(".mine .open-records").await;
    d.wait_text(".granted .record h3", "hba1c-2026.pdf").await;
    p.click("#tab-requests").await;
    p.click(".grant .revoke").await;
    p.click(".grant .confirm-revoke").await;
    p.wait_text("#notice", "Access revoked").await;
    p.wait_text("#grant-list-message", "No one has access now")
        .await;

    // The doctor's next download is refused, in a sentence rather than JSON.
    d.click(".granted .record .download").await;
    d.wait_text(
        ".granted .record .message",
        "This access is no longer active",
    )
    .await;
    assert!(!d.page_text().await.contains("grant_not_active"));
    d.click("#tab-requests").await;
    d.wait_text(".mine h3", "Revoked").await;
    d.wait_gone(".mine .open-records").await;

    // The language switch: the same pages in Kiswahili, and back.
    p.select("#lang", "sw").await;
    p.wait_text("#tab-records", "Rekodi zangu").await;
    p.wait_text("#signout", "Toka").await;
    p.click("#tab-records").await;
    p.wait_text(".record", "Matokeo ya maabara").await;
    shots(&p, "patient-records-sw", shots_here).await;
    p.select("#lang", "en").await;
    p.wait_text("#tab-records", "My records").await;
    sign_out(&p).await;
    // A wrong password, in Kiswahili.
    p.select("#lang", "sw").await;
    p.wait_text("#signin-form h1", "Ingia").await;
    p.fill("#phone", &patient_phone).await;
    p.fill("#password", "not the password at all").await;
    p.click("#signin-submit").await;
    p.wait_text("#signin-message", "Nambari ya simu na nenosiri havilingani")
        .await;

    // The auditor: history, export, and the patient's disclosures.
    sign_out(&d).await;
    let auditor_phone = app.phone();
    app.add_staff("auditor", &auditor_phone, "Baraka Auditor");
    sign_in(&d, &auditor_phone).await;
    d.wait_text(".event h3", "RecordAccessed").await;
    shots(&d, "auditor-history", shots_here).await;
    d.fill("#filter-type", "AccessApproved").await;
    d.click("#history-submit").await;
    d.wait_text(".event h3", "AccessApproved").await;
    d.click("#history-export").await;
    let export = d
        .downloaded(Some("afyachain-audit.ndjson"), Duration::from_secs(20))
        .await;
    let lines: Vec<Value> = String::from_utf8(export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|e| e["event_type"] == "AccessApproved"));
    let token = app.sign_in(&patient_phone).await;
    let patient_id = subject_id(&app, &token).await;
    d.click("#tab-disclosures").await;
    d.fill("#disclosure-patient", &patient_id).await;
    d.click("#disclosures-submit").await;
    d.wait_text(".disclosure", "KMPDC-0099").await;
    d.wait_text(".disclosure", "Diabetes follow-up").await;

    p.close().await;
    d.close().await;
    daraja.stop().await;
    std::fs::remove_dir_all(&dir).ok();
    app.stop().await;
}
