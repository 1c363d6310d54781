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
    // The page links its files under the version of the whole set.
    let text = page.text();
    let version = text
        .split("src=\"/assets/v-")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    assert_eq!(version.len(), 16, "{text}");
    assert!(text.contains(&format!(
        r#"<script type="module" src="/assets/v-{version}/app.js">"#
    )));
    assert!(text.contains(&format!(r#"href="/assets/v-{version}/app.css""#)));
    let csp = page.header("content-security-policy").unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(page.header("cache-control").as_deref(), Some("no-cache"));
    for (path, media_type) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/core.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/i18n/sw.json", "application/json"),
    ] {
        let file = app.get(path, None).await;
        assert_eq!(file.status, 200, "{path}");
        assert_eq!(file.header("content-type").as_deref(), Some(media_type));
        assert_eq!(file.header("cache-control").as_deref(), Some("no-cache"));
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
        // The versioned path is the same file, cached for good.
        let versioned = path.replace("/assets/", &format!("/assets/v-{version}/"));
        let kept = app.get(&versioned, None).await;
        assert_eq!(kept.status, 200, "{versioned}");
        assert_eq!(kept.text(), file.text());
        assert_eq!(
            kept.header("cache-control").as_deref(),
            Some("public, max-age=31536000, immutable")
        );
        // Only the current version is served: any other is not found.
        for other in ["v-0123456789abcdef", "v-anything", "v-", "v-../v-x"] {
            let older = app
                .get(
                    &path.replace("/assets/", &format!("/assets/{other}/")),
                    None,
                )
                .await;
            older.problem(404, "not_found");
        }
        // Gzipped for clients that ask, with its own tag.
        let packed = app
            .http
            .get(app.server.url(path))
            .header("Accept-Encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(packed.status(), 200);
        assert_eq!(packed.headers()["content-encoding"], "gzip", "{path}");
        assert_eq!(packed.headers()["vary"], "Accept-Encoding");
        assert_ne!(packed.headers()["etag"].to_str().unwrap(), etag);
        let packed_len = packed.bytes().await.unwrap().len();
        assert!(packed_len < file.text().len(), "{path}: {packed_len}");
    }
    // HEAD answers like GET, without the body.
    let head = app.http.head(app.server.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.bytes().await.unwrap().len(), 0);
    // What the page adapts to.
    let config = app.get("/v1/client-config", None).await.ok(200);
    assert_eq!(config["max_upload_bytes"], 25 * 1024 * 1024);
    assert_eq!(config["payments"], false);
    assert!(config["explorer_tx_url"].is_null());
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
