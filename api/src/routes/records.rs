//! Uploading records (encrypted before they touch storage), listing them, and reading
//! their content: every read by anyone but the patient is a command that records
//! `RecordAccessed` before a byte is served.

use actix_web::http::header::{self, ContentDisposition, DispositionParam, DispositionType};
use actix_web::http::StatusCode;
use actix_web::web::{Data, Path, Payload, Query};
use actix_web::{HttpRequest, HttpResponse};
use commands::UploadRecord;
use domain::actor::Actor;
use domain::ids::{AccessRequestId, PatientId, RecordId};
use domain::value::{Category, Filename, MediaType, Scope};
use projections::queries::{self, AccessRequestRow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use commands::spool::Spool;

use crate::extract::{
    closing, command_meta, declared_length, read_to_spool, spool_problem, Caller, Pace,
    SPOOL_CHARGE,
};
use crate::problem::{Problem, Validation};
use crate::routes::{own_patient, path_id, PageQuery};
use crate::server::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// One of lab, imaging, prescription, diagnosis, immunization, clinical_note, other.
    pub category: Option<String>,
    /// The original file name (kept encrypted).
    pub filename: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordCreated {
    pub record_id: Uuid,
    /// SHA-256 (hex) of the encrypted blob as stored: its content address.
    pub sha256: String,
    /// Size of the original bytes.
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordItem {
    pub record_id: Uuid,
    pub category: String,
    pub content_type: String,
    pub filename: Option<String>,
    pub size: i64,
    pub sha256: String,
    pub uploaded_at: String,
    pub storage_status: StorageStatus,
    /// The record's token on chain (decimal), once minted.
    pub token_id: Option<String>,
    /// The transaction that minted it.
    pub token_tx_hash: Option<String>,
}

/// Where the encrypted content is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StorageStatus {
    /// No remote store is configured: the encrypted content is kept on this node only.
    Local,
    /// Kept on this node and waiting to be copied to the remote store.
    Pending,
    /// Copied to the remote store and recorded (`RecordStored`).
    Stored,
}

impl StorageStatus {
    /// The status of a record, given the configured remote backend and whether it
    /// holds a confirmed copy.
    pub fn of(backend: Option<&str>, stored_on: Option<&str>) -> StorageStatus {
        match backend {
            None => StorageStatus::Local,
            Some(b) if stored_on == Some(b) => StorageStatus::Stored,
            Some(_) => StorageStatus::Pending,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordPage {
    pub items: Vec<RecordItem>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

#[utoipa::path(post, path = "/v1/patients/{patient_id}/records", tag = "records",
    params(("patient_id" = Uuid, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file's raw bytes, sent with its own media type as Content-Type"),
    security(("bearer" = [])),
    responses((status = 201, description = "Encrypted and stored", body = RecordCreated)))]
#[tracing::instrument(skip_all)]
pub async fn upload(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<UploadQuery>,
    mut payload: Payload,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    let media_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| MediaType::parse(v).ok())
        .ok_or_else(|| {
            Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the file's media type as Content-Type, e.g. application/pdf",
            )
            .at("Content-Type")
        })?;
    let mut v = Validation::default();
    let category = match query.category.as_deref() {
        Some(c) => v.check(Category::parse(c)),
        None => {
            v.fail("category", "is required");
            None
        }
    };
    let filename = query
        .filename
        .as_deref()
        .and_then(|f| v.check(Filename::parse(f)));
    v.finish()?;
    let category = crate::problem::checked(category)?;
    // The body is received into a spool on disk. It takes its declared length of the
    // patient's share of the spool budget before a byte is read (a patient's uploads
    // queue among themselves), but of the overall spool budget only what it has
    // received (a spool's file and buffers first): a slow sender holds a file and what
    // it sent, not memory, and slow senders of many accounts cannot fill the budget. Once whole, it takes its share of the
    // memory budget and is read back into one allocation with room for the
    // encryption, which then works in place; that permit lasts until the ciphertext
    // is stored.
    let limit = state.config.max_upload_bytes;
    let account = patient_id.to_string();
    let read = async {
        let length = declared_length(&req, limit)?;
        if length == Some(0) {
            return Err(Problem::field("body", "must not be empty"));
        }
        let expected = length.unwrap_or(limit);
        let mut spooled = state
            .spools
            .acquire_staged(&account, expected.max(SPOOL_CHARGE), SPOOL_CHARGE)
            .await?;
        let mut spool = Spool::create(&state.spool_dir, expected)
            .await
            .map_err(spool_problem)?;
        read_to_spool(
            &mut payload,
            &mut spool,
            &state.spools,
            &mut spooled,
            expected,
            Pace::upload(&state.config.bodies),
        )
        .await?;
        let permit = state.uploads.acquire(&account, spool.len()).await?;
        let body = spool
            .into_body(commands::keys::RECORD_OVERHEAD)
            .await
            .map_err(spool_problem)?;
        drop(spooled);
        Ok::<_, Problem>((permit, body))
    };
    let (permit, body) = match read.await {
        Ok(read) => read,
        Err(problem) => return Ok(closing(&problem)),
    };
    if body.is_empty() {
        return Err(Problem::field("body", "must not be empty"));
    }
    let meta = command_meta(&req, Some(caller.actor()), &body)?;
    let uploaded = state
        .commands
        .upload_record_body(
            UploadRecord {
                by: caller.actor(),
                patient_id,
                category,
                media_type,
                filename: filename.as_ref(),
            },
            body,
            meta,
        )
        .await;
    drop(permit);
    let uploaded = uploaded?;
    state.settle.settle(&uploaded.outcome).await;
    Ok(HttpResponse::Created().json(RecordCreated {
        record_id: uploaded.record_id.as_uuid(),
        sha256: uploaded.sha256,
        size: uploaded.size,
    }))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/records", tag = "records",
    params(("patient_id" = Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient's records (for a doctor: those an active grant covers; a page may then hold fewer than `limit`)", body = RecordPage)))]
#[tracing::instrument(skip_all)]
pub async fn list(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    let (after, limit) = query.parse()?;
    let pool = state.store.any_pool();
    // The patient sees everything; a doctor what their active grants cover.
    let covering: Option<Vec<Scope>> = match caller.actor() {
        Actor::Doctor(d) => {
            let grants =
                queries::active_grants_of_doctor(pool, &d.to_string(), state.commands.now())
                    .await?;
            let scopes: Vec<Scope> = grants
                .iter()
                .filter(|g| g.patient_id == patient_id.to_string())
                .filter_map(|g| serde_json::from_str(&g.scope).ok())
                .collect();
            if scopes.is_empty() {
                return Err(Problem::forbidden(
                    "no_grant",
                    "no active grant from this patient",
                ));
            }
            Some(scopes)
        }
        _ => {
            own_patient(&caller, patient_id)?;
            None
        }
    };
    let backend = state.storage.backend();
    let page =
        queries::records_of_patient(pool, &patient_id.to_string(), backend, after, limit).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for row in page.items {
        let covered = covering.as_ref().is_none_or(|scopes| {
            let category = Category::parse(&row.category).ok();
            let record = RecordId::parse(&row.record_id).ok();
            scopes.iter().any(|s| match (category, record) {
                (Some(c), Some(r)) => s.covers(c, r),
                _ => false,
            })
        });
        if !covered {
            continue;
        }
        let filename = opened_name(&state, &row.patient_id, row.filename_sealed.as_deref()).await;
        items.push(RecordItem {
            record_id: Uuid::parse_str(&row.record_id).unwrap_or_default(),
            category: row.category,
            content_type: row.media_type,
            filename,
            size: row.size,
            sha256: row.sha256,
            uploaded_at: row.uploaded_at,
            storage_status: StorageStatus::of(backend, row.stored_on.as_deref()),
            token_id: row.token_id,
            token_tx_hash: row.token_tx_hash,
        });
    }
    Ok(HttpResponse::Ok().json(RecordPage {
        items,
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/records/{record_id}", tag = "records",
    params(("record_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "A record's metadata, storage status and token (the patient; a doctor whose active grant covers it)", body = RecordItem)))]
#[tracing::instrument(skip_all)]
pub async fn get(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let record_id: RecordId = path_id(&path, "record")?;
    let not_found = || Problem::not_found("record_not_found", "no such record");
    let pool = state.store.any_pool();
    let backend = state.storage.backend();
    let row = queries::record(pool, &record_id.to_string(), backend)
        .await?
        .ok_or_else(not_found)?;
    let allowed = match caller.actor() {
        Actor::Patient(p) => p.to_string() == row.patient_id,
        Actor::Doctor(d) => {
            let category = Category::parse(&row.category).ok();
            queries::active_grants_of_doctor(pool, &d.to_string(), state.commands.now())
                .await?
                .iter()
                .filter(|g| g.patient_id == row.patient_id)
                .filter_map(|g| serde_json::from_str::<Scope>(&g.scope).ok())
                .any(|s| category.is_some_and(|c| s.covers(c, record_id)))
        }
        _ => {
            return Err(Problem::forbidden(
                "role_forbidden",
                "only the patient and doctors they granted may see records",
            ))
        }
    };
    // Another patient's record, or one no grant covers, is not revealed to exist.
    if !allowed {
        return Err(not_found());
    }
    let filename = opened_name(&state, &row.patient_id, row.filename_sealed.as_deref()).await;
    Ok(HttpResponse::Ok().json(RecordItem {
        record_id: record_id.as_uuid(),
        category: row.category,
        content_type: row.media_type,
        filename,
        size: row.size,
        sha256: row.sha256,
        uploaded_at: row.uploaded_at,
        storage_status: StorageStatus::of(backend, row.stored_on.as_deref()),
        token_id: row.token_id,
        token_tx_hash: row.token_tx_hash,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// For a doctor: the approved request to read under (default: the doctor's active
    /// grant from this patient that covers the record).
    pub request_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/records/{record_id}/content", tag = "records",
    params(("record_id" = Uuid, Path), ContentQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The original bytes, with the media type they were uploaded with; a doctor's read is recorded first", content_type = "*/*", body = Vec<u8>)))]
#[tracing::instrument(skip_all)]
pub async fn content(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<ContentQuery>,
) -> Result<HttpResponse, Problem> {
    let record_id: RecordId = path_id(&path, "record")?;
    let not_found = || Problem::not_found("record_not_found", "no such record");
    let actor = caller.actor();
    if !matches!(actor, Actor::Patient(_) | Actor::Doctor(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only the patient and doctors they granted may read records",
        ));
    }
    let record = state
        .commands
        .record(record_id)
        .await?
        .ok_or_else(not_found)?;
    let patient_id = record.patient_id().ok_or_else(not_found)?;
    let request_id = match actor {
        Actor::Patient(p) if p == patient_id => None,
        Actor::Doctor(d) => {
            let explicit = match query.request_id.as_deref() {
                Some(raw) => Some(
                    AccessRequestId::parse(raw)
                        .map_err(|_| Problem::field("request_id", "must be a UUID"))?,
                ),
                None => None,
            };
            let pool = state.store.any_pool();
            let (doctor, patient) = (d.to_string(), patient_id.to_string());
            // The read model only suggests which request to read under; the
            // record decides on the event store's state of that request. Nobody
            // who never dealt with this patient learns the record exists,
            // whatever request id they name.
            let chosen = match explicit {
                Some(id) => queries::access_request(pool, &id.to_string())
                    .await?
                    .filter(|r| r.doctor_id == doctor && r.patient_id == patient)
                    .map(|_| id),
                None => {
                    let requests = queries::requests_between(pool, &doctor, &patient).await?;
                    choose_request(&requests, &record, state.commands.now())
                }
            };
            Some(chosen.ok_or_else(not_found)?)
        }
        _ => return Err(not_found()),
    };
    let meta = command_meta(&req, Some(actor), b"")?;
    let (outcome, bytes) = state
        .commands
        .read_record(&record, actor, request_id, meta)
        .await?;
    state.settle.settle(&outcome).await;
    let media_type = served_type(record.media_type().map(MediaType::as_str));
    let mut response = HttpResponse::Ok();
    // Whatever a patient uploaded, no browser renders it in our origin: a download
    // (attachment), of the declared type only (nosniff), and, should a browser show it
    // anyway, in a sandbox: a unique origin with no scripts, forms or plugins.
    response
        .content_type(media_type)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, "sandbox"));
    let mut disposition = ContentDisposition {
        disposition: DispositionType::Attachment,
        parameters: Vec::new(),
    };
    if let (Some(sealed), Some(patient_id)) = (record.filename(), record.patient_id()) {
        if let Some(name) =
            opened_name(&state, &patient_id.to_string(), Some(sealed.as_str())).await
        {
            // A plain ASCII name as well, for clients that do not read `filename*`.
            let plain: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            disposition.parameters = vec![
                DispositionParam::Filename(plain),
                DispositionParam::FilenameExt(actix_web::http::header::ExtendedValue {
                    charset: actix_web::http::header::Charset::Ext("UTF-8".to_owned()),
                    language_tag: None,
                    value: name.into_bytes(),
                }),
            ];
        }
    }
    response.insert_header(disposition);
    Ok(response.body(bytes))
}

/// A record's file name as shown: opened from its seal, without the bidirectional and
/// other control characters that names stored before they were refused may hold (a
/// right-to-left override would make `invoice_fdp.exe` read as `invoice_exe.pdf`).
async fn opened_name(state: &AppState, patient_id: &str, sealed: Option<&str>) -> Option<String> {
    let name = state.commands.open_text(patient_id, sealed?).await?;
    Some(shown_name(&name))
}

fn shown_name(name: &str) -> String {
    name.chars()
        .filter(|c| !domain::value::is_bidi_control(*c) && !c.is_control())
        .collect()
}

/// The type record content is served as: its own when no browser runs or renders
/// active content of it (documents, pictures, sound, video, plain text), otherwise
/// `application/octet-stream`. An allow-list, since the active types are many
/// (HTML, XHTML, SVG, XML and XSLT, JavaScript, ...). The CSP header does not protect a
/// copy the web app turns into a `blob:` URL, which runs in the app's own origin and
/// takes its type from the answer: so an HTML record never comes back as HTML. The
/// record's metadata still says what was uploaded.
fn served_type(media_type: Option<&str>) -> &str {
    const OCTETS: &str = "application/octet-stream";
    let Some(media_type) = media_type else {
        return OCTETS;
    };
    let Some((kind, subtype)) = media_type.split_once('/') else {
        return OCTETS;
    };
    // Office documents are zip packages (their names merely mention XML).
    let office = media_type.starts_with("application/vnd.openxmlformats-officedocument.")
        || media_type.starts_with("application/vnd.oasis.opendocument.");
    // `image/svg+xml` and every other XML-based type can carry script.
    if (!office && subtype.contains("xml"))
        || subtype.contains("script")
        || subtype.contains("html")
    {
        return OCTETS;
    }
    let passive = matches!(kind, "image" | "audio" | "video")
        || matches!(
            media_type,
            "application/pdf"
                | "application/dicom"
                | "application/json"
                | "application/zip"
                | "application/msword"
                | "application/vnd.ms-excel"
                | "text/plain"
                | "text/csv"
        )
        || office;
    if passive {
        media_type
    } else {
        OCTETS
    }
}

/// The request a doctor's read goes under: an approved, unexpired one covering the
/// record if the read model knows one, else the newest (which the record refuses with
/// the precise reason: revoked, expired, not covered).
fn choose_request(
    requests: &[AccessRequestRow],
    record: &domain::record::MedicalRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<AccessRequestId> {
    let now = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let covers = |r: &AccessRequestRow| {
        let scope: Option<Scope> = serde_json::from_str(&r.scope).ok();
        match (scope, record.category(), record.id()) {
            (Some(s), Some(c), Some(id)) => s.covers(c, id),
            _ => false,
        }
    };
    requests
        .iter()
        .find(|r| {
            r.status == "approved"
                && r.expires_at.as_deref().is_some_and(|e| e > now.as_str())
                && covers(r)
        })
        .or_else(|| requests.first())
        .and_then(|r| AccessRequestId::parse(&r.request_id).ok())
}

#[cfg(test)]
mod tests {
    use super::{served_type, shown_name};

    #[test]
    fn active_types_are_served_as_bytes_and_documents_as_themselves() {
        for active in [
            "text/html",
            "application/xhtml+xml",
            "image/svg+xml",
            "text/xml",
            "application/xml",
            "text/javascript",
            "application/javascript",
            "application/ecmascript",
            "text/xsl",
            "application/x-shockwave-flash",
            "multipart/x-mixed-replace",
            "text/css",
        ] {
            assert_eq!(
                served_type(Some(active)),
                "application/octet-stream",
                "{active}"
            );
        }
        for passive in [
            "application/pdf",
            "image/png",
            "image/jpeg",
            "text/plain",
            "application/dicom",
            "video/mp4",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ] {
            assert_eq!(served_type(Some(passive)), passive);
        }
        assert_eq!(served_type(None), "application/octet-stream");
    }

    #[test]
    fn names_stored_before_bidi_controls_were_refused_are_shown_without_them() {
        assert_eq!(shown_name("invoice_\u{202E}fdp.exe"), "invoice_fdp.exe");
        assert_eq!(
            shown_name("\u{2066}scan\u{2069}\u{200F}\u{061C}.pdf"),
            "scan.pdf"
        );
        assert_eq!(shown_name("line\r\nbreak\u{0}.pdf"), "linebreak.pdf");
        assert_eq!(
            shown_name("Matokeo ya maabara é.pdf"),
            "Matokeo ya maabara é.pdf"
        );
    }
}
