#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The read models after a consent story, on both backends: what the API will show,
//! that a rebuild from position 0 reproduces the live tables exactly, and that no
//! plaintext personal data or record content reaches the event store or the blobs.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use commands::blobs::LocalBlobStore;
use commands::keys::{KeyStore, SecretKey};
use commands::{
    ApproveAccess, CommandError, Commands, RegisterDoctor, RegisterPatient, RegisterWebhook,
    RequestAccess, RequestPayment, UploadRecord,
};
use domain::actor::Actor;
use domain::clock::Clock;
use domain::ids::StaffId;
use domain::value::{
    BirthDate, Category, DurationDays, Filename, LicenceNumber, MediaType, Msisdn, Note, Password,
    PersonName, Purpose, Scope,
};
use eventstore::testing::{TestStore, BACKENDS};
use eventstore::{CommandMeta, ConsumerActor, ConsumerHandle, LogCursor, Runner};
use projections::queries;

struct TestClock(Mutex<DateTime<Utc>>);

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn meta() -> CommandMeta {
    CommandMeta::new("test")
}

async fn wait_all(handles: &[ConsumerHandle], target: LogCursor) {
    for h in handles {
        assert!(
            h.wait_for(target, Duration::from_secs(10)).await,
            "projection did not catch up"
        );
    }
}

const WALLET: &str = "0x52908400098527886E0F7030069857D2E4169EE7";
const NAME: &str = "Achieng Otieno";
const PHONE: &str = "254712345678";
const BIRTH: &str = "1987-03-14";
const PASSWORD: &str = "patient password 1";
const FILENAME: &str = "achieng-hba1c-results.pdf";
const PURPOSE: &str = "Diabetes follow-up for Achieng";
const CONTENT: &[u8] = b"%PDF-1.4 HbA1c 9.1% patient Achieng Otieno";

#[actix_rt::test]
async fn read_models_follow_the_consent_story_and_rebuild_to_the_same_tables() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let blob_dir = std::env::temp_dir().join(format!("afya-blobs-{}", uuid::Uuid::new_v4()));
        let clock = Arc::new(TestClock(Mutex::new(Utc::now())));
        let keys = Arc::new(KeyStore::new(
            SecretKey::generate(),
            t.store.any_pool().clone(),
        ));
        let cmds = Commands::new(
            t.store.clone(),
            keys.clone(),
            Arc::new(LocalBlobStore::new(&blob_dir)),
            clock.clone(),
        );
        let mut handles = Vec::new();
        for p in projections::all() {
            handles.push(ConsumerActor::spawn(t.store.clone(), p).await.unwrap());
        }

        let today = clock.now().date_naive();
        let patient = cmds
            .register_patient(
                RegisterPatient {
                    name: &PersonName::parse(NAME).unwrap(),
                    phone: &Msisdn::parse(PHONE).unwrap(),
                    birth_date: &BirthDate::parse(BIRTH, today).unwrap(),
                    password: &Password::parse(PASSWORD).unwrap(),
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        // The patient's own wallet (its address sealed; its index in rm_patient_wallets).
        cmds.register_wallet(patient, WALLET, meta()).await.unwrap();
        // A share code, then another replacing it (one row in rm_share_codes).
        cmds.issue_share_code(patient, meta()).await.unwrap();
        cmds.issue_share_code(patient, meta()).await.unwrap();
        // An integrator with a webhook (its URL and secret sealed; in rm_webhooks).
        let (integrator, _key) = cmds
            .add_integrator(
                "Claims Co",
                ["RecordUploaded".to_owned()].into_iter().collect(),
                meta(),
            )
            .await
            .unwrap();
        cmds.register_webhook(
            RegisterWebhook {
                integrator_id: integrator,
                webhook_id: domain::ids::WebhookId::new(),
                url: "https://claims.example/hooks/afya?token=hook-url-token",
                types: ["RecordUploaded".to_owned()].into_iter().collect(),
                secret: "hook signing secret value",
            },
            meta(),
        )
        .await
        .unwrap();
        // A consultation fee paid by M-Pesa, and a callback that settled nothing.
        let paid = cmds
            .request_payment(
                RequestPayment {
                    payer: Actor::Patient(patient),
                    purpose: domain::payment::Purpose::ConsultationFee,
                    amount_kes: 500,
                    plan: &cmds
                        .plan_payment(Actor::Patient(patient), None, &[])
                        .await
                        .unwrap(),
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        cmds.payment_command(
            paid,
            domain::payment::PaymentCommand::AcceptPush {
                by: Actor::System,
                merchant_request_id: "29115-34620561-1".into(),
                checkout_request_id: "ws_CO_191220191020363925".into(),
            },
        )
        .await
        .unwrap();
        cmds.payment_command(
            paid,
            domain::payment::PaymentCommand::Settle {
                by: Actor::System,
                result_code: 0,
                result_desc: "The service request is processed successfully.".into(),
                receipt: None,
                settled_by: domain::payment::SettledBy::Query,
            },
        )
        .await
        .unwrap();
        cmds.reject_callback(domain::payment::RejectedCallbackCommand::Record {
            by: Actor::System,
            reason: "unknown_checkout_request_id".into(),
            checkout_request_id: "ws_CO_000".into(),
            result_code: 1032,
            mpesa_receipt: None,
            amount_kes: None,
            payment_id: None,
        })
        .await
        .unwrap();
        let doctor = cmds
            .register_doctor(
                RegisterDoctor {
                    name: &PersonName::parse("Dr Kamau").unwrap(),
                    phone: &Msisdn::parse("0722000111").unwrap(),
                    licence: LicenceNumber::parse("KMPDC-0042").unwrap(),
                    password: &Password::parse("doctor password 1").unwrap(),
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        let lab = cmds
            .upload_record(
                UploadRecord {
                    by: Actor::Patient(patient),
                    patient_id: patient,
                    category: Category::Lab,
                    media_type: MediaType::parse("application/pdf").unwrap(),
                    filename: Some(&Filename::parse(FILENAME).unwrap()),
                },
                CONTENT,
                meta(),
            )
            .await
            .unwrap()
            .record_id;
        let _imaging = cmds
            .upload_record(
                UploadRecord {
                    by: Actor::Patient(patient),
                    patient_id: patient,
                    category: Category::Imaging,
                    media_type: MediaType::parse("image/png").unwrap(),
                    filename: None,
                },
                b"\x89PNG fake",
                meta(),
            )
            .await
            .unwrap()
            .record_id;
        let lab_scope = Scope::new([Category::Lab].into(), BTreeSet::new()).unwrap();
        let purpose = Purpose::parse(PURPOSE).unwrap();
        let thirty = DurationDays::new(30).unwrap();

        // An unverified doctor cannot ask.
        let refused = cmds
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: lab_scope.clone(),
                    purpose: &purpose,
                    duration: thirty,
                    note: None,
                },
                meta(),
            )
            .await;
        assert!(
            matches!(refused, Err(CommandError::Rejected { .. })),
            "{backend:?}"
        );
        cmds.verify_doctor(doctor, StaffId::new(), meta())
            .await
            .unwrap();

        let granted = cmds
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: lab_scope.clone(),
                    purpose: &purpose,
                    duration: thirty,
                    note: None,
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        cmds.approve_access(
            ApproveAccess {
                request_id: granted,
                by: Actor::Patient(patient),
                expires_at: None,
                scope: None,
            },
            meta(),
        )
        .await
        .unwrap();
        let rejected = cmds
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: lab_scope.clone(),
                    purpose: &purpose,
                    duration: thirty,
                    note: None,
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        cmds.reject_access(
            rejected,
            Actor::Patient(patient),
            Some(&Note::parse("reason", "not now").unwrap()),
            meta(),
        )
        .await
        .unwrap();
        let revoked = cmds
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: lab_scope.clone(),
                    purpose: &purpose,
                    duration: thirty,
                    note: None,
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        cmds.approve_access(
            ApproveAccess {
                request_id: revoked,
                by: Actor::Patient(patient),
                expires_at: None,
                scope: None,
            },
            meta(),
        )
        .await
        .unwrap();
        let short = cmds
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: lab_scope.clone(),
                    purpose: &purpose,
                    duration: thirty,
                    note: None,
                },
                meta(),
            )
            .await
            .unwrap()
            .id;
        let in_a_day = clock.now() + chrono::Duration::days(1);
        cmds.approve_access(
            ApproveAccess {
                request_id: short,
                by: Actor::Patient(patient),
                expires_at: Some(in_a_day),
                scope: None,
            },
            meta(),
        )
        .await
        .unwrap();

        // The doctor reads under the grant: recorded. The patient's own read: not.
        let record = cmds.record(lab).await.unwrap().unwrap();
        assert_eq!(record.category(), Some(Category::Lab));
        let (_, content) = cmds
            .read_record(&record, Actor::Doctor(doctor), Some(granted), meta())
            .await
            .unwrap();
        assert_eq!(content, CONTENT);
        let own = cmds
            .read_record(&record, Actor::Patient(patient), None, meta())
            .await
            .unwrap()
            .0;
        assert_eq!(own.sequences, None);
        cmds.revoke_access(revoked, Actor::Patient(patient), meta())
            .await
            .unwrap();
        let after_revoke = cmds
            .read_record(&record, Actor::Doctor(doctor), Some(revoked), meta())
            .await;
        assert!(matches!(after_revoke, Err(CommandError::Rejected { .. })));

        // Two days later the short grant has expired: reads refused, then swept.
        *clock.0.lock().unwrap() += chrono::Duration::days(2);
        let expired_read = cmds
            .read_record(&record, Actor::Doctor(doctor), Some(short), meta())
            .await;
        assert!(matches!(expired_read, Err(CommandError::Rejected { .. })));
        // The storage adapter confirms a remote copy of the lab result, twice (a
        // replay): one RecordStored.
        for _ in 0..2 {
            cmds.mark_stored(lab, "s3:story", "blobs/lab", Some("\"etag\"".into()))
                .await
                .unwrap();
        }
        // The chain adapter records the lab result's token, twice (a replay): one event.
        for _ in 0..2 {
            cmds.mark_minted(
                lab,
                domain::record::ChainTx {
                    chain_id: 31337,
                    contract: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
                    token_id: "256".into(),
                    tx_hash: format!("0x{}", "ab".repeat(32)),
                    block: 3,
                },
            )
            .await
            .unwrap();
        }
        cmds.record_anchor(
            1,
            4,
            format!("0x{}", "cd".repeat(32)),
            domain::access::ChainReceipt {
                chain_id: 31337,
                contract: "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512".into(),
                tx_hash: format!("0x{}", "ef".repeat(32)),
                block: 5,
            },
        )
        .await
        .unwrap();
        let last = cmds.expire_access(short, meta()).await.unwrap();

        let end = t
            .store
            .cursor_of(
                "access_request",
                &short.to_string(),
                last.sequences.unwrap().1,
            )
            .await
            .unwrap()
            .unwrap();
        wait_all(&handles, end).await;
        let pool = t.store.any_pool();

        let records = queries::records_of_patient(pool, &patient.to_string(), None, 0, 1)
            .await
            .unwrap();
        assert_eq!(records.items.len(), 1, "{backend:?}: page size");
        let rest = queries::records_of_patient(
            pool,
            &patient.to_string(),
            None,
            records.next_cursor.unwrap(),
            10,
        )
        .await
        .unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.next_cursor, None);
        assert_eq!(records.items[0].category, "lab");
        assert_eq!(records.items[0].size, CONTENT.len() as i64);

        let now = clock.now();
        let statuses = |status: &'static str| async move {
            queries::access_requests_of_patient(
                pool,
                &patient.to_string(),
                Some(status),
                now,
                0,
                50,
            )
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|r| r.request_id)
            .collect::<Vec<_>>()
        };
        assert_eq!(
            statuses("approved").await,
            vec![granted.to_string()],
            "{backend:?}"
        );
        assert_eq!(statuses("rejected").await, vec![rejected.to_string()]);
        assert_eq!(statuses("revoked").await, vec![revoked.to_string()]);
        assert_eq!(statuses("expired").await, vec![short.to_string()]);
        assert!(statuses("pending").await.is_empty());
        let all = queries::access_requests_of_patient(
            pool,
            &patient.to_string(),
            None,
            clock.now(),
            0,
            50,
        )
        .await
        .unwrap();
        assert_eq!(all.items.len(), 4);

        let grants = queries::active_grants_of_doctor(pool, &doctor.to_string(), clock.now())
            .await
            .unwrap();
        assert_eq!(
            grants
                .iter()
                .map(|g| g.request_id.clone())
                .collect::<Vec<_>>(),
            vec![granted.to_string()]
        );

        let log = queries::access_log_of_patient(pool, &patient.to_string(), 0, 50)
            .await
            .unwrap();
        assert_eq!(
            log.items.len(),
            1,
            "{backend:?}: one doctor read, the patient's own read is not logged"
        );
        assert_eq!(log.items[0].accessor, format!("doctor:{doctor}"));
        assert_eq!(log.items[0].request_id, Some(granted.to_string()));
        assert_eq!(log.items[0].record_id, lab.to_string());

        let doc = queries::doctor(pool, &doctor.to_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (doc.status.as_str(), doc.licence.as_str()),
            ("verified", "KMPDC-0042")
        );
        assert_eq!(
            queries::patient_by_phone_index(pool, &keys.phone_index(PHONE))
                .await
                .unwrap(),
            Some(patient.to_string())
        );

        // Rebuild every projection from position 0: the tables come out identical.
        let mut live = Vec::new();
        for p in projections::all() {
            for table in p.tables() {
                live.push((
                    table.clone(),
                    queries::dump_table(pool, &table).await.unwrap(),
                ));
            }
        }
        for h in &handles {
            h.stop().await;
        }
        for p in projections::all() {
            let mut runner = Runner::new(t.store.clone(), p).await.unwrap();
            runner.rebuild().await.unwrap();
            runner.unlock().await;
        }
        for (table, rows) in live {
            assert!(!rows.is_empty(), "{table} should have rows");
            assert_eq!(
                queries::dump_table(pool, &table).await.unwrap(),
                rows,
                "{backend:?}: {table}"
            );
        }

        // No plaintext personal data or content in the raw event store...
        let raw: Vec<String> = match backend {
            eventstore::Backend::Postgres => {
                sqlx::query_scalar("SELECT payload::text || metadata::text FROM events")
                    .fetch_all(t.store.pg_pool().unwrap())
                    .await
                    .unwrap()
            }
            eventstore::Backend::Sqlite => {
                sqlx::query_scalar("SELECT payload || metadata FROM events")
                    .fetch_all(t.store.sqlite_pool().unwrap())
                    .await
                    .unwrap()
            }
        };
        let raw = raw.join("\n");
        assert!(raw.contains("PatientRegistered"));
        for secret in [
            NAME,
            "Achieng",
            PHONE,
            "0722000111",
            "Dr Kamau",
            BIRTH,
            FILENAME,
            PURPOSE,
            "not now",
            "HbA1c",
            PASSWORD,
            "$argon2id",
            WALLET,
            &WALLET[2..].to_lowercase(),
            "hook-url-token",
            "hook signing secret value",
        ] {
            assert!(
                !raw.contains(secret),
                "{backend:?}: event store holds {secret:?}"
            );
        }
        // ...nor in the stored blobs, which decrypt back to the exact bytes.
        let mut blobs = Vec::new();
        for dir in std::fs::read_dir(blob_dir.join("blobs")).unwrap() {
            for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                blobs.push(std::fs::read(f.unwrap().path()).unwrap());
            }
        }
        assert_eq!(blobs.len(), 2);
        for blob in &blobs {
            assert!(!blob.windows(5).any(|w| w == b"HbA1c" || w == b"%PDF-"));
        }
        let row = queries::record(pool, &lab.to_string(), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.stored_on, None);
        let on_s3 = queries::record(pool, &lab.to_string(), Some("s3:story"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(on_s3.stored_on.as_deref(), Some("s3:story"));
        assert_eq!(
            queries::dump_table(pool, "rm_record_replicas")
                .await
                .unwrap()
                .len(),
            1
        );
        let ciphertext = blobs
            .iter()
            .find(|b| commands::keys::hex(&sha2_digest(b)) == row.sha256)
            .unwrap();
        let plain = keys
            .decrypt_record(
                &patient.to_string(),
                &lab.to_string(),
                &row.wrapped_key,
                ciphertext,
            )
            .await
            .unwrap();
        assert_eq!(plain, CONTENT);
        // Crypto-shredding: without the patient's key the content is gone.
        keys.shred(&patient.to_string()).await.unwrap();
        assert!(keys
            .decrypt_record(
                &patient.to_string(),
                &lab.to_string(),
                &row.wrapped_key,
                ciphertext
            )
            .await
            .is_err());

        let _ = std::fs::remove_dir_all(blob_dir);
        t.cleanup().await.unwrap();
    }
}

fn sha2_digest(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}
