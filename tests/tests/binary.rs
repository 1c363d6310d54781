#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The `afyachain` binary, started for real: serve, health, graceful shutdown, the log
//! tail and projection rebuilds, on both backends.

mod support;

use std::time::Duration;

use eventstore::testing::BACKENDS;
use support::Env;

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[actix_rt::test]
async fn serve_needs_no_configuration_answers_health_and_stops_on_sigterm() {
    for backend in BACKENDS {
        let Some(env) = Env::new(backend).await else {
            continue;
        };
        let server = env.serve();
        assert_eq!(get(&server.url("/healthz")).await.0, 200, "{backend:?}");
        let (status, body) = get(&server.url("/readyz")).await;
        assert_eq!(status, 200, "{backend:?}: {body}");
        assert_eq!(get(&server.url("/nope")).await.0, 404);
        let logs = server.logs();
        assert!(server.terminate(), "{backend:?}: clean exit on SIGTERM");
        assert!(logs.contains("afyachain listening"), "{logs}");
        if backend == eventstore::Backend::Sqlite {
            // The embedded default created its store and a development key.
            assert!(env.data_dir.join("afyachain.db").exists());
            assert!(env.data_dir.join("keys/master.key").exists());
        }
        env.cleanup().await;
    }
}

#[actix_rt::test]
async fn events_tail_prints_the_log_and_rebuild_replays_it() {
    for backend in BACKENDS {
        let Some(env) = Env::new(backend).await else {
            continue;
        };
        // Write a few events through the real write side, then read them back out.
        let config = match &env.database_url {
            Some(url) => eventstore::StoreConfig::Postgres { url: url.clone() },
            None => eventstore::StoreConfig::Sqlite {
                path: env.data_dir.join("afyachain.db"),
            },
        };
        let store = eventstore::Store::open(config).await.unwrap();
        let master = commands::keys::load_master_key(&env.data_dir).unwrap();
        let keys = std::sync::Arc::new(commands::keys::KeyStore::new(
            master,
            store.any_pool().clone(),
        ));
        let cmds = commands::Commands::new(
            store.clone(),
            keys,
            std::sync::Arc::new(commands::blobs::LocalBlobStore::new(&env.data_dir)),
            std::sync::Arc::new(commands::clock::SystemClock),
        );
        let name = domain::value::PersonName::parse("Wanjiru Kamau").unwrap();
        let today = chrono::Utc::now().date_naive();
        let birth = domain::value::BirthDate::parse("1990-04-01", today).unwrap();
        let password = domain::value::Password::parse("wanjiru password").unwrap();
        // Each sign-up appends PatientRegistered and AccountOpened.
        for phone in ["254712345678", "254712345679", "254712345670"] {
            cmds.register_patient(
                commands::RegisterPatient {
                    name: &name,
                    phone: &domain::value::Msisdn::parse(phone).unwrap(),
                    birth_date: &birth,
                    password: &password,
                },
                eventstore::CommandMeta::new("system"),
            )
            .await
            .unwrap();
        }
        store.close().await;

        let (ok, out, err) = env.run(&["events", "tail", "--from", "0"]);
        assert!(ok, "{err}");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6, "{backend:?}: {out}");
        assert_eq!(lines[0]["event_type"], "PatientRegistered");
        assert_eq!(lines[1]["event_type"], "AccountOpened");
        assert!(lines[0]["event_id"].is_string() && lines[0]["position"].is_i64());
        // No plaintext personal data in what the log holds.
        assert!(
            !out.contains("Wanjiru")
                && !out.contains("254712345678")
                && !out.contains("1990-04-01")
                && !out.contains("wanjiru password")
        );
        let second = lines[1]["position"].as_i64().unwrap();
        let (ok, out, _) = env.run(&["events", "tail", "--from", &second.to_string()]);
        assert!(ok);
        assert_eq!(
            out.lines().count(),
            5,
            "{backend:?}: from the second event on"
        );

        // A running server holds the projections' locks: rebuild refuses.
        let server = env.serve();
        let (ok, _, err) = env.run(&["projections", "rebuild", "directory"]);
        assert!(
            !ok,
            "{backend:?}: rebuild must refuse while the server runs"
        );
        assert!(err.contains("running in another process"), "{err}");
        let logs = server.log.clone();
        let clean = server.terminate();
        assert!(clean, "{}", logs.lock().unwrap());

        let (ok, out, err) = env.run(&["projections", "rebuild", "all"]);
        assert!(ok, "{err}");
        assert!(out.contains("directory: rebuilt from 6 events"), "{out}");
        let (ok, out, err) = env.run(&["projections", "rebuild", "nonexistent"]);
        assert!(
            !ok && out.is_empty() && err.contains("no projection named"),
            "{err}"
        );
        let (ok, out, _) = env.run(&["projections", "list"]);
        assert!(ok && out.contains("access_log"), "{out}");
        env.cleanup().await;
    }
}
