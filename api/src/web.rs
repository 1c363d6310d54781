//! The web app's files, embedded in the binary (no front-end server, no build step),
//! served at `/` and `/assets/…` with a strict Content-Security-Policy: scripts and
//! styles from this origin only, no inline code, no framing, API calls to this origin.
//! Clients that accept gzip get the files gzipped (made once, on first use); every
//! answer carries an ETag, so a phone revalidates with a 304 instead of downloading.

use std::io::Write;
use std::sync::OnceLock;

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
    asset!("core.js", "text/javascript; charset=utf-8"),
    asset!("patient.js", "text/javascript; charset=utf-8"),
    asset!("doctor.js", "text/javascript; charset=utf-8"),
    asset!("payments.js", "text/javascript; charset=utf-8"),
    asset!("staff.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("i18n/en.json", "application/json"),
    asset!("i18n/sw.json", "application/json"),
];

/// The policy every page and file is served under. Trusted Types are required, so even
/// a mistaken HTML sink in a script would be refused by the browser.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// Files under `/assets/v-<version>/` never change: the version is a hash of them all.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(
        web::resource("/")
            .route(web::get().to(index))
            .route(web::head().to(index)),
    )
    .service(
        web::resource("/assets/{name:.+}")
            .route(web::get().to(asset))
            .route(web::head().to(asset)),
    );
}

/// One file as served: its bytes, gzipped copy (where smaller) and tags.
struct Served {
    media_type: &'static str,
    bytes: Vec<u8>,
    gzipped: Option<Vec<u8>>,
    etag: String,
    etag_gzip: String,
}

impl Served {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Served {
        let hex = hex16(&bytes);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let gzipped = encoder
            .write_all(&bytes)
            .ok()
            .and_then(|()| encoder.finish().ok())
            .filter(|packed| packed.len() < bytes.len());
        Served {
            media_type,
            bytes,
            gzipped,
            // Each encoding is its own representation, with its own tag.
            etag: format!("\"{hex}\""),
            etag_gzip: format!("\"{hex}-gz\""),
        }
    }
}

fn hex16(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The version of the whole set of files: a hash of every name and byte.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let mut all = Vec::new();
        for a in ASSETS {
            all.extend_from_slice(a.name.as_bytes());
            all.push(0);
            all.extend_from_slice(a.bytes);
        }
        hex16(&all)
    })
}

/// Every file as served, by name. The page links its files under `/assets/v-<version>/`
/// (scripts import each other by relative paths, so they follow), which can be cached
/// for good: a new build has a new version.
fn served() -> &'static [(&'static str, Served)] {
    static SERVED: OnceLock<Vec<(&'static str, Served)>> = OnceLock::new();
    SERVED.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let bytes = if a.name == "index.html" {
                    String::from_utf8_lossy(a.bytes)
                        .replace("\"/assets/", &format!("\"/assets/v-{}/", version()))
                        .into_bytes()
                } else {
                    a.bytes.to_vec()
                };
                (a.name, Served::new(a.media_type, bytes))
            })
            .collect()
    })
}

fn find(name: &str) -> Option<&'static Served> {
    served().iter().find(|(n, _)| *n == name).map(|(_, s)| s)
}

async fn index(req: HttpRequest) -> HttpResponse {
    match find("index.html") {
        Some(page) => serve(&req, page, "no-cache"),
        None => Problem::not_found("route_not_found", "no such resource").error_response(),
    }
}

async fn asset(req: HttpRequest, name: Path<String>) -> HttpResponse {
    // `v-<version>/name`: of this version, cached for good. Any other version is not
    // found: serving today's file under it would let anyone mint endless URLs for the
    // same bytes (each cached apart), and hand an old page scripts it was not built
    // with; the page itself is revalidated, so a reload links the current version. A
    // bare name is revalidated.
    let (name, cache) = match name.strip_prefix("v-").and_then(|n| n.split_once('/')) {
        Some((v, rest)) if v == version() => (rest, IMMUTABLE),
        Some(_) => return Problem::not_found("not_found", "no such file").error_response(),
        None => (name.as_str(), "no-cache"),
    };
    match find(name).filter(|_| name != "index.html") {
        Some(file) => serve(&req, file, cache),
        None => Problem::not_found("not_found", "no such file").error_response(),
    }
}

fn accepts_gzip(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| p.replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// The file with its headers; 304 when the client holds this version.
fn serve(req: &HttpRequest, file: &'static Served, cache: &str) -> HttpResponse {
    let packed = file.gzipped.as_ref().filter(|_| accepts_gzip(req));
    let etag = if packed.is_some() {
        &file.etag_gzip
    } else {
        &file.etag
    };
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
    resp.insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, cache))
        .insert_header((header::VARY, "Accept-Encoding"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((
            "Permissions-Policy",
            "camera=(), geolocation=(), microphone=()",
        ));
    if fresh {
        return resp.finish();
    }
    resp.content_type(file.media_type);
    match packed {
        Some(bytes) => resp
            .insert_header((header::CONTENT_ENCODING, "gzip"))
            .body(bytes.as_slice()),
        None => resp.body(file.bytes.as_slice()),
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
        let keys = |lang: &str| words(lang).keys().cloned().collect::<BTreeSet<String>>();
        assert_eq!(keys("en"), keys("sw"));
    }

    fn words(lang: &str) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_slice(&find(&format!("i18n/{lang}.json")).unwrap().bytes).unwrap()
    }

    /// The quoted `word.word` strings of the scripts: the sentence keys they use.
    fn literal_keys(text: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for piece in text.split('"').skip(1).step_by(2) {
            let parts: Vec<&str> = piece.split('.').collect();
            let wordy = parts.len() >= 2
                && parts.iter().all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
            if wordy && !piece.ends_with(".js") && !piece.ends_with(".json") {
                keys.insert(piece.to_owned());
            }
        }
        keys
    }

    #[test]
    fn every_sentence_the_scripts_use_is_in_the_dictionary() {
        let en = words("en");
        for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(file.bytes).unwrap();
            for key in literal_keys(text) {
                assert!(
                    en.contains_key(&key),
                    "{} uses {key}, missing in en.json",
                    file.name
                );
            }
        }
        // Keys made from values the API sends.
        let families: &[(&str, &[&str])] = &[
            (
                "category",
                &[
                    "lab",
                    "imaging",
                    "prescription",
                    "diagnosis",
                    "immunization",
                    "clinical_note",
                    "other",
                ],
            ),
            ("storage", &["local", "pending", "stored"]),
            (
                "payment.status",
                &["pending", "confirmed", "failed", "cancelled", "timed_out"],
            ),
            ("payment.purpose", &["consultation_fee", "access_fee"]),
            (
                "request.status",
                &["pending", "approved", "rejected", "revoked", "expired"],
            ),
            (
                "role",
                &["patient", "doctor", "registrar", "auditor", "integrator"],
            ),
            ("signup.title", &["patient", "doctor"]),
            (
                "patient.tab",
                &["records", "requests", "log", "payments", "share"],
            ),
            ("doctor.tab", &["find", "requests", "payments"]),
            ("registrar.tab", &["queue", "verified"]),
            ("auditor.tab", &["history", "disclosures", "verify"]),
        ];
        for (family, values) in families {
            for value in *values {
                let key = format!("{family}.{value}");
                assert!(en.contains_key(&key), "missing {key}");
            }
        }
        for category in domain::value::Category::ALL {
            assert!(en.contains_key(&format!("category.{}", category.as_str())));
        }
    }

    #[test]
    fn gzip_is_served_only_to_clients_that_accept_it() {
        let req = |accept: Option<&str>| {
            let mut r = actix_web::test::TestRequest::default();
            if let Some(a) = accept {
                r = r.insert_header((header::ACCEPT_ENCODING, a));
            }
            r.to_http_request()
        };
        assert!(accepts_gzip(&req(Some("gzip, deflate, br"))));
        assert!(accepts_gzip(&req(Some("br;q=1.0, gzip;q=0.8"))));
        assert!(!accepts_gzip(&req(Some("gzip;q=0, br"))));
        assert!(!accepts_gzip(&req(Some("identity"))));
        assert!(!accepts_gzip(&req(None)));
        let app = find("app.js").unwrap();
        let plain = serve(&req(None), app, "no-cache");
        assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
        let packed = serve(&req(Some("gzip")), app, "no-cache");
        assert_eq!(
            packed.headers().get(header::CONTENT_ENCODING).unwrap(),
            "gzip"
        );
        assert_ne!(
            plain.headers().get(header::ETAG),
            packed.headers().get(header::ETAG)
        );
        // Every gzipped copy unpacks to the file.
        for (name, file) in served() {
            if let Some(packed) = &file.gzipped {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(packed.as_slice()),
                    &mut out,
                )
                .unwrap();
                assert_eq!(out, file.bytes, "{name}");
            }
        }
    }

    #[test]
    fn the_pages_stay_small() {
        let total: usize = ASSETS.iter().map(|a| a.bytes.len()).sum();
        let packed: usize = served()
            .iter()
            .map(|(_, f)| f.gzipped.as_ref().map_or(f.bytes.len(), Vec::len))
            .sum();
        println!("the web app weighs {total} bytes, {packed} gzipped");
        assert!(total <= 120 * 1024, "the web app weighs {total} bytes");
        assert!(
            packed <= 40 * 1024,
            "the web app weighs {packed} bytes gzipped"
        );
    }
}
