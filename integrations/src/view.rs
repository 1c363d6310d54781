//! The integrator view of an event: ids, categories, statuses and times, never personal
//! data or medical content.
//!
//! The view is an allow-list over the payload's fields, so a field added to an event
//! later is private until someone decides otherwise here (docs/architecture.md rule 5).

use chrono::{DateTime, Utc};
use eventstore::StoredEvent;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// One event as integrators (webhooks, the subscription API) receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntegratorEvent {
    /// Global log position.
    pub position: i64,
    /// Unique id of the event: receivers deduplicate by it.
    pub event_id: Uuid,
    /// The event's type name, e.g. `AccessApproved`.
    pub event_type: String,
    /// The aggregate kind, e.g. `access`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// When the event was recorded (RFC 3339).
    pub recorded_at: DateTime<Utc>,
    /// The allow-listed fields of the payload.
    pub data: Map<String, Value>,
}

/// The integrator view of `event`: its envelope and only the allow-listed payload fields.
pub fn public_view(event: &StoredEvent) -> IntegratorEvent {
    IntegratorEvent {
        position: event.position,
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        aggregate_type: event.aggregate_type.clone(),
        // Some aggregates are keyed by a keyed hash (an account by its phone index):
        // only opaque UUID ids are shown.
        aggregate_id: if Uuid::parse_str(&event.aggregate_id).is_ok() {
            event.aggregate_id.clone()
        } else {
            String::new()
        },
        recorded_at: event.recorded_at,
        data: public_fields(&event.payload),
    }
}

/// The allow-listed fields of a payload. Domain events are externally tagged enums
/// (`{"RecordUploaded": {...}}`); a payload that is not is filtered as it is.
pub fn public_fields(payload: &Value) -> Map<String, Value> {
    let inner = match payload.as_object() {
        Some(outer) if outer.len() == 1 => match outer.values().next() {
            Some(Value::Object(inner)) => inner,
            _ => outer,
        },
        Some(outer) => outer,
        None => return Map::new(),
    };
    inner
        .iter()
        .filter(|(name, value)| is_public(name, value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Whether the field `name` with `value` may be shown to integrators.
fn is_public(name: &str, value: &Value) -> bool {
    if contains_sealed(value) || is_private_name(name) {
        return false;
    }
    match name {
        "category" | "status" | "outcome" => is_plain_string(value),
        "categories" => is_string_array(value),
        "result_code" | "duration_days" | "duration" => value.is_number(),
        "version" => is_plain_string(value) || value.is_number(),
        "scope" => is_public_scope(value),
        _ if is_id_name(name) => is_id_value(value),
        _ if name.ends_with("_at") => is_plain_string(value) || value.is_null(),
        _ => false,
    }
}

/// Names that are never shown whatever their value (belt and braces: none of them is
/// allow-listed either).
fn is_private_name(name: &str) -> bool {
    name.ends_with("_index")
        || matches!(
            name,
            "purpose" | "name" | "personal" | "note" | "content_hash" | "blob" | "key"
        )
}

fn is_id_name(name: &str) -> bool {
    name.ends_with("_id") || name.ends_with("_ids")
}

fn is_sealed_text(text: &str) -> bool {
    text.starts_with("v1.")
}

fn contains_sealed(value: &Value) -> bool {
    match value {
        Value::String(s) => is_sealed_text(s),
        Value::Array(items) => items.iter().any(contains_sealed),
        Value::Object(map) => map.values().any(contains_sealed),
        _ => false,
    }
}

fn is_plain_string(value: &Value) -> bool {
    matches!(value, Value::String(s) if !is_sealed_text(s))
}

fn is_string_array(value: &Value) -> bool {
    matches!(value, Value::Array(items) if items.iter().all(is_plain_string))
}

/// An id: a string (a UUID or an external reference), an array of them, or absent.
fn is_id_value(value: &Value) -> bool {
    value.is_null() || is_plain_string(value) || is_string_array(value)
}

/// A scope is shown only when it holds nothing but categories and ids.
fn is_public_scope(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().all(|(name, value)| match name.as_str() {
            "categories" => is_string_array(value),
            n if is_id_name(n) => is_id_value(value),
            _ => false,
        }),
        _ => false,
    }
}

/// Every domain event type, for validating which types an integrator may subscribe to.
pub fn event_types() -> &'static [&'static str] {
    &[
        // patient
        "PatientRegistered",
        "PatientProfileUpdated",
        "WalletRegistered",
        "CustodialAddressInUse",
        // doctor
        "DoctorRegistered",
        "DoctorVerified",
        "DoctorSuspended",
        // staff
        "StaffRegistered",
        // account and session
        "AccountOpened",
        "SessionStarted",
        "SessionEnded",
        // record
        "RecordUploaded",
        "RecordAccessed",
        "RecordStored",
        "RecordIntegrityFailed",
        "RecordTokenMinted",
        // access
        "AccessRequested",
        "AccessApproved",
        "AccessRejected",
        "AccessRevoked",
        "AccessExpired",
        "ConsentGrantedOnChain",
        "ConsentRevokedOnChain",
        // payment
        "PaymentRequested",
        "StkPushAccepted",
        "StkPushFailed",
        "PaymentConfirmed",
        "PaymentFailed",
        "PaymentReconciled",
        "PaymasterBudgetCredited",
        "MpesaCallbackRejected",
        // anchor
        "LogRangeAnchored",
        // integrator
        "IntegratorAdded",
        "WebhookRegistered",
        "IntegratorDisabled",
        "ShareCodeIssued",
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::{BTreeSet, HashSet};

    use domain::access::AccessEvent;
    use domain::actor::Actor;
    use domain::ids::{AccessRequestId, DoctorId, PatientId, PaymentId, RecordId};
    use domain::patient::PatientEvent;
    use domain::payment::{PaymentEvent, PaymentStatus, Purpose as PaymentPurpose, SettledBy};
    use domain::record::RecordEvent;
    use domain::value::{
        ByteSize, Category, DurationDays, MediaType, Scope, Sealed, Sha256Hex, WrappedKey,
    };
    use serde_json::json;

    use super::*;

    const SEALED_NAME: &str = "v1.bmFtZS1jaXBoZXJ0ZXh0";
    const SEALED_PURPOSE: &str = "v1.cHVycG9zZS1jaXBoZXJ0ZXh0";
    const SEALED_PHONE: &str = "v1.cGhvbmUtY2lwaGVydGV4dA";
    const PHONE_INDEX: &str = "3f1b8e0c9a7d6b5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e";
    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn stored(event_type: &str, payload: Value) -> StoredEvent {
        StoredEvent {
            position: 7,
            tx: 7,
            event_id: Uuid::new_v4(),
            recorded_at: Utc::now(),
            aggregate_type: "test".into(),
            aggregate_id: Uuid::new_v4().to_string(),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1.0".into(),
            payload,
            metadata: json!({"actor": "test"}),
        }
    }

    #[test]
    fn an_aggregate_keyed_by_a_phone_index_shows_no_id() {
        let mut event = stored("AccountOpened", json!({"AccountOpened": {}}));
        event.aggregate_type = "account".into();
        event.aggregate_id = "9f2c4e".repeat(10);
        let view = public_view(&event);
        assert_eq!(view.aggregate_id, "");
        assert!(!serde_json::to_string(&view).unwrap().contains("9f2c4e"));
        let uuid = stored("RecordUploaded", json!({"RecordUploaded": {}}));
        assert_eq!(public_view(&uuid).aggregate_id, uuid.aggregate_id);
    }

    fn view_of<E: Serialize>(event_type: &str, event: &E) -> IntegratorEvent {
        public_view(&stored(event_type, serde_json::to_value(event).unwrap()))
    }

    fn assert_no_secrets(view: &IntegratorEvent) {
        let text = serde_json::to_string(view).unwrap();
        for secret in [
            SEALED_NAME,
            SEALED_PURPOSE,
            SEALED_PHONE,
            PHONE_INDEX,
            "v1.",
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
        for field in [
            "purpose",
            "personal",
            "phone",
            "phone_index",
            "wallet",
            "wallet_index",
            "note",
            "filename",
            "wrapped_key",
            "sha256",
            "accessor",
        ] {
            assert!(!view.data.contains_key(field), "{field} leaked into {text}");
        }
    }

    #[test]
    fn patient_registration_shows_the_id_but_not_the_person_or_phone_index() {
        let patient = PatientId::new();
        let view = view_of(
            "PatientRegistered",
            &PatientEvent::PatientRegistered {
                patient_id: patient,
                personal: Sealed::from_ciphertext(SEALED_NAME.into()),
                phone_index: PHONE_INDEX.into(),
            },
        );
        assert_no_secrets(&view);
        assert_eq!(
            view.data.get("patient_id"),
            Some(&json!(patient.to_string()))
        );
        assert_eq!(view.data.len(), 1);
        assert_eq!(view.event_type, "PatientRegistered");
        assert_eq!(view.position, 7);
    }

    #[test]
    fn wallet_registration_hides_the_wallet_and_its_index() {
        let view = view_of(
            "WalletRegistered",
            &PatientEvent::WalletRegistered {
                patient_id: PatientId::new(),
                wallet: Sealed::from_ciphertext("v1.d2FsbGV0".into()),
                wallet_index: PHONE_INDEX.into(),
            },
        );
        assert_no_secrets(&view);
        assert_eq!(view.data.keys().collect::<Vec<_>>(), ["patient_id"]);
    }

    #[test]
    fn access_request_shows_ids_scope_duration_and_time_but_not_purpose_or_note() {
        let request = AccessRequestId::new();
        let doctor = DoctorId::new();
        let patient = PatientId::new();
        let record = RecordId::new();
        let at = Utc::now();
        let view = view_of(
            "AccessRequested",
            &AccessEvent::AccessRequested {
                request_id: request,
                doctor_id: doctor,
                patient_id: patient,
                scope: Scope::new([Category::Lab].into(), [record].into()).unwrap(),
                purpose: Sealed::from_ciphertext(SEALED_PURPOSE.into()),
                duration: DurationDays::new(30).unwrap(),
                note: Some(Sealed::from_ciphertext(SEALED_NAME.into())),
                requested_at: at,
            },
        );
        assert_no_secrets(&view);
        assert_eq!(view.data["request_id"], json!(request.to_string()));
        assert_eq!(view.data["doctor_id"], json!(doctor.to_string()));
        assert_eq!(view.data["patient_id"], json!(patient.to_string()));
        assert_eq!(
            view.data["scope"],
            json!({"categories": ["lab"], "record_ids": [record.to_string()]})
        );
        assert_eq!(view.data["duration"], json!(30));
        assert_eq!(view.data["requested_at"], serde_json::to_value(at).unwrap());
    }

    #[test]
    fn access_approval_shows_expiry_and_approval_times() {
        let view = view_of(
            "AccessApproved",
            &AccessEvent::AccessApproved {
                request_id: AccessRequestId::new(),
                patient_id: PatientId::new(),
                doctor_id: DoctorId::new(),
                scope: Scope::new(BTreeSet::from([Category::Imaging]), BTreeSet::new()).unwrap(),
                expires_at: Utc::now(),
                approved_at: Utc::now(),
            },
        );
        assert_no_secrets(&view);
        for field in [
            "request_id",
            "patient_id",
            "doctor_id",
            "scope",
            "expires_at",
            "approved_at",
        ] {
            assert!(view.data.contains_key(field), "{field} missing");
        }
    }

    #[test]
    fn record_upload_shows_category_but_no_content_key_or_filename() {
        let record = RecordId::new();
        let view = view_of(
            "RecordUploaded",
            &RecordEvent::RecordUploaded {
                record_id: record,
                patient_id: PatientId::new(),
                category: Category::ClinicalNote,
                media_type: MediaType::parse("application/pdf").unwrap(),
                size: ByteSize::new(42).unwrap(),
                sha256: Sha256Hex::parse(SHA).unwrap(),
                wrapped_key: WrappedKey::from_ciphertext("v1.a2V5".into()),
                filename: Some(Sealed::from_ciphertext(SEALED_NAME.into())),
                uploaded_at: Utc::now(),
            },
        );
        assert_no_secrets(&view);
        assert!(!serde_json::to_string(&view).unwrap().contains(SHA));
        assert_eq!(view.data["category"], json!("clinical_note"));
        assert_eq!(view.data["record_id"], json!(record.to_string()));
        assert!(view.data.contains_key("uploaded_at"));
        assert!(!view.data.contains_key("media_type"));
        assert!(!view.data.contains_key("size"));
    }

    #[test]
    fn record_access_hides_the_accessor_object_but_keeps_ids() {
        let view = view_of(
            "RecordAccessed",
            &RecordEvent::RecordAccessed {
                record_id: RecordId::new(),
                patient_id: PatientId::new(),
                accessor: Actor::Doctor(DoctorId::new()),
                request_id: Some(AccessRequestId::new()),
                category: Category::Lab,
                accessed_at: Utc::now(),
            },
        );
        assert_no_secrets(&view);
        assert!(view.data.contains_key("request_id"));
        assert!(view.data.contains_key("accessed_at"));
    }

    #[test]
    fn payment_shows_ids_and_status_but_not_phone_amount_or_purpose() {
        let payment = PaymentId::new();
        let requested = view_of(
            "PaymentRequested",
            &PaymentEvent::PaymentRequested {
                payment_id: payment,
                payer: format!("patient:{}", PatientId::new()),
                purpose: PaymentPurpose::ConsultationFee,
                amount_kes: 500,
                phone: Sealed::from_ciphertext(SEALED_PHONE.into()),
                phone_index: PHONE_INDEX.into(),
                doctor_id: None,
                access_request_id: Some(AccessRequestId::new()),
                patient_id: Some(PatientId::new()),
                phone_sealed_for_patient: false,
            },
        );
        assert_no_secrets(&requested);
        assert_eq!(requested.data["payment_id"], json!(payment.to_string()));
        assert!(requested.data.contains_key("access_request_id"));
        assert!(!requested.data.contains_key("payer"));
        assert!(!requested.data.contains_key("amount_kes"));

        let failed = view_of(
            "PaymentFailed",
            &PaymentEvent::PaymentFailed {
                payment_id: payment,
                result_code: 1032,
                result_desc: "Request cancelled by user".into(),
                status: PaymentStatus::Cancelled,
                settled_by: SettledBy::Callback,
            },
        );
        assert_no_secrets(&failed);
        assert_eq!(failed.data["result_code"], json!(1032));
        assert!(failed.data.contains_key("status"));
        assert!(!failed.data.contains_key("result_desc"));
    }

    #[test]
    fn unknown_fields_sealed_values_and_rich_scopes_are_dropped() {
        let view = public_view(&stored(
            "Future",
            json!({"Future": {
                "thing_id": "abc",
                "other_id": SEALED_NAME,
                "shiny_new_field": "maybe personal",
                "email_index": "deadbeef",
                "status": SEALED_NAME,
                "scope": {"categories": ["lab"], "why": "personal"},
                "done_at": "2024-01-01T00:00:00Z",
                "content_hash": "abc",
                "version": 2,
            }}),
        ));
        assert_eq!(
            view.data,
            json!({"thing_id": "abc", "done_at": "2024-01-01T00:00:00Z", "version": 2})
                .as_object()
                .unwrap()
                .clone()
        );
    }

    #[test]
    fn the_view_round_trips_through_json_with_rfc3339_times() {
        let view = view_of(
            "SessionEnded",
            &domain::session::SessionEvent::SessionEnded {
                session_id: Uuid::new_v4(),
                ended_at: Utc::now(),
            },
        );
        let text = serde_json::to_value(&view).unwrap();
        let recorded = text["recorded_at"].as_str().unwrap();
        assert!(DateTime::parse_from_rfc3339(recorded).is_ok());
        let back: IntegratorEvent = serde_json::from_value(text).unwrap();
        assert_eq!(back, view);
    }

    /// The list must name every event type the domain defines (read from the sources'
    /// `event_type()` implementations), and nothing else.
    #[test]
    fn event_types_match_the_domain() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../domain/src");
        let mut found = HashSet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for body in source.split("fn event_type(&self)").skip(1) {
                let body = body.split("fn event_version").next().unwrap();
                for quoted in body.split('"').skip(1).step_by(2) {
                    if quoted
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_uppercase())
                    {
                        found.insert(quoted.to_owned());
                    }
                }
            }
        }
        let listed: HashSet<String> = event_types().iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            listed.len(),
            event_types().len(),
            "duplicates in event_types()"
        );
        assert!(found.len() >= 30, "scan found too little: {found:?}");
        assert_eq!(listed, found);
    }
}
