//! The web app's files, embedded in the binary (no front-end server, no build step),
//! served at `/` and `/assets/…` with a strict Content-Security-Policy: scripts and
//! styles from this origin only, no inline code, no framing, API calls to this origin.

use actix_web::http::header;
use actix_web::web::{self, Path, ServiceConfig};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// One embedded file.
pub struct Asset {
    pub name: &'static str,
    pub media_type: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $media_type:literal) => {
        Asset {
            name: $name,
            media_type: $media_type,
            bytes: include_bytes!(concat!("../web/", $name)),
        }
    };
}

/// Every file of `api/web` (a test checks none is missing).
pub const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("i18n/en.json", "application/json"),
    asset!("i18n/sw.json", "application/json"),
];

/// The policy every page and file is served under.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(index)))
        .service(web::resource("/assets/{name:.+}").route(web::get().to(asset)));
}

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

async fn index(req: HttpRequest) -> HttpResponse {
    match find("index.html") {
        Some(page) => serve(&req, page, "no-cache"),
        None => Problem::not_found("route_not_found", "no such resource").error_response(),
    }
}

async fn asset(req: HttpRequest, name: Path<String>) -> HttpResponse {
    match find(&name).filter(|a| a.name != "index.html") {
        // Names are not content-hashed yet: revalidate rather than cache for long.
        Some(file) => serve(&req, file, "no-cache"),
        None => Problem::not_found("not_found", "no such file").error_response(),
    }
}

/// The file with its headers; 304 when the client holds this version.
fn serve(req: &HttpRequest, file: &Asset, cache: &str) -> HttpResponse {
    let digest = Sha256::digest(file.bytes);
    let etag = format!(
        "\"{}\"",
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, cache))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((
            "Permissions-Policy",
            "camera=(), geolocation=(), microphone=()",
        ));
    if fresh {
        resp.finish()
    } else {
        resp.content_type(file.media_type).body(file.bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::collections::BTreeSet;

    use super::*;

    fn files(dir: &std::path::Path, base: &std::path::Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, base, out);
            } else {
                let name = path.strip_prefix(base).unwrap().to_string_lossy();
                out.insert(name.replace('\\', "/"));
            }
        }
    }

    #[test]
    fn every_file_of_the_web_folder_is_embedded() {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        let mut on_disk = BTreeSet::new();
        files(&base, &base, &mut on_disk);
        let embedded: BTreeSet<String> = ASSETS.iter().map(|a| a.name.to_owned()).collect();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn scripts_use_no_html_sinks_inline_code_or_storage() {
        for file in ASSETS {
            let text = std::str::from_utf8(file.bytes).unwrap();
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "localStorage",
                "sessionStorage",
                "onclick=",
                "onload=",
            ] {
                assert!(!text.contains(banned), "{} uses {banned}", file.name);
            }
            if file.name.ends_with(".html") {
                assert!(!text.contains("<script>"), "inline script in {}", file.name);
                assert!(!text.contains("style="), "inline style in {}", file.name);
            }
        }
    }

    #[test]
    fn both_languages_have_the_same_sentences() {
        let keys = |name: &str| -> BTreeSet<String> {
            let file = find(name).unwrap();
            let map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(file.bytes).unwrap();
            map.keys().cloned().collect()
        };
        assert_eq!(keys("i18n/en.json"), keys("i18n/sw.json"));
    }

    #[test]
    fn the_pages_stay_small() {
        let total: usize = ASSETS.iter().map(|a| a.bytes.len()).sum();
        assert!(total <= 90 * 1024, "the web app weighs {total} bytes");
    }
}
