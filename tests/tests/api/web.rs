//! The web app's files come from the binary itself, under a strict CSP.

use eventstore::Backend;

use crate::app::TestApp;

#[actix_rt::test]
async fn the_server_serves_its_embedded_web_app_under_a_strict_policy() {
    let Some(app) = TestApp::start(Backend::Sqlite).await else {
        return;
    };
    let page = app.get("/", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(page
        .text()
        .contains(r#"<script type="module" src="/assets/app.js">"#));
    let csp = page.header("content-security-policy").unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    for (path, media_type) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/i18n/sw.json", "application/json"),
    ] {
        let file = app.get(path, None).await;
        assert_eq!(file.status, 200, "{path}");
        assert_eq!(file.header("content-type").as_deref(), Some(media_type));
        // A client holding this version gets 304 and no body.
        let etag = file.header("etag").unwrap();
        let again = app
            .http
            .get(app.server.url(path))
            .header("If-None-Match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    let sw = app.get("/assets/i18n/sw.json", None).await.json();
    assert_eq!(sw["signin.title"], "Ingia");
    for missing in [
        "/assets/nope.js",
        "/assets/index.html",
        "/assets/../Cargo.toml",
    ] {
        assert_eq!(app.get(missing, None).await.status, 404, "{missing}");
    }
    app.stop().await;
}
