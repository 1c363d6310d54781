//! Accounts: staff from the command line, sign-in limits, session lifetime.

use eventstore::testing::BACKENDS;
use serde_json::json;

use crate::app::{password_of, TestApp};

#[actix_rt::test]
async fn staff_are_added_from_the_command_line_with_the_password_on_stdin() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let phone = app.phone();
        let staff_id = app.add_staff("auditor", &phone, "Amani Auditor");
        assert!(uuid::Uuid::parse_str(&staff_id).is_ok(), "{staff_id}");
        let session = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": password_of(&phone)}),
            )
            .await
            .ok(200);
        assert_eq!(
            (session["role"].as_str(), session["subject_id"].as_str()),
            (Some("auditor"), Some(staff_id.as_str()))
        );

        // Refusals name the problem and create nothing.
        let before = app.event_count().await;
        let other = app.phone();
        let (ok, _, err) = app.env.run_with_input(
            &[
                "staff", "add", "--role", "admin", "--phone", &other, "--name", "X Y",
            ],
            "long enough password\n",
        );
        assert!(!ok && err.contains("role"), "{err}");
        let (ok, _, err) = app.env.run_with_input(
            &[
                "staff",
                "add",
                "--role",
                "registrar",
                "--phone",
                &other,
                "--name",
                "X Y",
            ],
            "short\n",
        );
        assert!(!ok && err.contains("password"), "{err}");
        let (ok, _, err) = app.env.run_with_input(
            &[
                "staff",
                "add",
                "--role",
                "registrar",
                "--phone",
                &phone,
                "--name",
                "X Y",
            ],
            "long enough password\n",
        );
        assert!(!ok && err.contains("already exists"), "{err}");
        assert_eq!(app.event_count().await, before);
        app.stop().await;
    }
}

#[actix_rt::test]
async fn failed_sign_ins_are_limited_per_phone_and_per_address() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start_with(
            backend,
            &[
                ("AFYA_SIGNIN_MAX_FAILURES_PER_PHONE", "3"),
                ("AFYA_SIGNIN_MAX_FAILURES_PER_IP", "6"),
            ],
        )
        .await
        else {
            continue;
        };
        let phones: Vec<String> = (0..3).map(|_| app.phone()).collect();
        for p in &phones {
            app.sign_up_patient(p, "Neema Achieng").await;
        }
        let attempt = |phone: &str, password: String| {
            app.post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": password}),
            )
        };
        for _ in 0..3 {
            attempt(&phones[0], "wrong password!".into())
                .await
                .problem(401, "bad_credentials");
        }
        // Locked: even the right password is refused until the window ends.
        let locked = attempt(&phones[0], password_of(&phones[0])).await;
        locked.problem(429, "too_many_attempts");
        let wait: u64 = locked.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=900).contains(&wait), "{wait}");
        // Other phones still sign in; a success clears nothing for the locked one.
        app.sign_in(&phones[1]).await;
        // Failures on other phones from the same address add up to its limit.
        for _ in 0..3 {
            attempt(&phones[1], "wrong password!".into())
                .await
                .problem(401, "bad_credentials");
        }
        attempt(&phones[2], password_of(&phones[2]))
            .await
            .problem(429, "too_many_attempts");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn a_session_lasts_as_configured_and_unknown_phones_fail_like_wrong_passwords() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start_with(backend, &[("AFYA_SESSION_TTL_SECS", "120")]).await
        else {
            continue;
        };
        let phone = app.phone();
        app.sign_up_patient(&phone, "Wanjiru Kamau").await;
        let session = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": password_of(&phone)}),
            )
            .await
            .ok(200);
        let expires: chrono::DateTime<chrono::Utc> =
            session["expires_at"].as_str().unwrap().parse().unwrap();
        let left = (expires - chrono::Utc::now()).num_seconds();
        assert!((100..=120).contains(&left), "{backend:?}: {left}");
        let current = app
            .get("/v1/sessions/current", session["token"].as_str())
            .await
            .ok(200);
        assert_eq!(current["expires_at"], session["expires_at"]);

        let wrong = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": "not the password"}),
            )
            .await
            .problem(401, "bad_credentials");
        let unknown = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": app.phone(), "password": "not the password"}),
            )
            .await
            .problem(401, "bad_credentials");
        assert_eq!(
            wrong, unknown,
            "the answer does not tell registered phones apart"
        );
        app.stop().await;
    }
}

#[actix_rt::test]
async fn a_burst_of_parallel_guesses_gets_no_more_tries_than_the_limit() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start_with(
            backend,
            &[
                ("AFYA_SIGNIN_MAX_FAILURES_PER_PHONE", "5"),
                ("AFYA_SIGNIN_MAX_FAILURES_PER_IP", "1000"),
            ],
        )
        .await
        else {
            continue;
        };
        let phone = app.phone();
        app.sign_up_patient(&phone, "Neema Achieng").await;
        let guesses = (0..30).map(|i| {
            app.post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": format!("wrong guess {i:03}")}),
            )
        });
        let answers = futures::future::join_all(guesses).await;
        let tried = answers.iter().filter(|r| r.status == 401).count();
        let refused = answers.iter().filter(|r| r.status == 429).count();
        assert_eq!((tried, refused), (5, 25), "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn sign_ups_that_find_a_taken_phone_are_limited_per_address() {
    for backend in BACKENDS {
        let Some(app) =
            TestApp::start_with(backend, &[("AFYA_SIGNIN_MAX_FAILURES_PER_IP", "3")]).await
        else {
            continue;
        };
        let taken = app.phone();
        app.sign_up_patient(&taken, "Neema Achieng").await;
        // Successful sign-ups use up nothing.
        for _ in 0..4 {
            app.sign_up_patient(&app.phone(), "Baraka Mwangi").await;
        }
        for _ in 0..3 {
            app.post("/v1/patients", None, TestApp::patient_body(&taken, "Probe"))
                .await
                .problem(409, "phone_taken");
        }
        let locked = app
            .post(
                "/v1/patients",
                None,
                TestApp::patient_body(&app.phone(), "Next"),
            )
            .await;
        locked.problem(429, "too_many_attempts");
        assert!(locked.header("retry-after").is_some());
        app.stop().await;
    }
}
