//! A headless Chromium driven through chromedriver (WebDriver), for tests that use the
//! web app as a person would: `Browser::start()` and one helper per gesture, each
//! waiting up to [`TIMEOUT`] and failing with what it awaited and the page's text.
//!
//! Chromium and chromedriver come from `scripts/tools` (`AFYA_CHROMIUM`,
//! `AFYA_CHROMEDRIVER`); without them the tests skip, except under `CI=true`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use eventstore::testing::in_ci;
use eventstore::Backend;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::app::TestApp;

pub use fantoccini::elements::Element;

/// How long a helper waits for the page before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Between two looks at the page while waiting.
const POLL: Duration = Duration::from_millis(50);

/// The window's height; tests choose the width (`set_width`). Headless Chromium keeps
/// about 140 px of it for its invisible window frame: the viewport is about 757 px.
const WINDOW_HEIGHT: u32 = 900;

/// Headless without a display, as root in a container (no sandbox, small /dev/shm), and
/// quiet: no network beyond what the page itself asks for (only loopback is open).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // Whatever the machine's locale, the app sees an English browser.
    "--lang=en-US",
    // No keyring daemon to ask for the profile's secrets.
    "--password-store=basic",
];

/// A running headless Chromium with its chromedriver. Dropping it ends both and
/// removes its profile and download directories.
pub struct Browser {
    client: Client,
    driver: Child,
    driver_url: String,
    session_id: Option<String>,
    /// Chromium's browser process: it outlives a killed chromedriver.
    browser_pid: Option<u64>,
    /// Holds the profile (`profile/`) and the downloads (`downloads/`).
    dir: PathBuf,
    closed: bool,
}

/// The file at `var`, else at `default`, if it exists.
fn locate(var: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var(var)
        .ok()
        .filter(|p| !p.trim().is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from);
    path.is_file().then_some(path)
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium through it,
    /// with a window 1280 × 900. `None` (skip, with a message) when either program is
    /// missing outside CI; a panic under CI, where skipping would hide the tests.
    pub async fn start() -> Option<Browser> {
        let (Some(chromedriver), Some(chromium)) = (
            locate("AFYA_CHROMEDRIVER", "/usr/bin/chromedriver"),
            locate("AFYA_CHROMIUM", "/usr/bin/chromium"),
        ) else {
            if in_ci() {
                panic!("CI=true and chromium/chromedriver missing: run scripts/tools");
            }
            eprintln!(
                "SKIPPED: chromium or chromedriver missing (AFYA_CHROMIUM, AFYA_CHROMEDRIVER); \
                 run scripts/tools"
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!("afya-browser-{}", uuid::Uuid::new_v4()));
        let profile = dir.join("profile");
        let downloads = dir.join("downloads");
        std::fs::create_dir_all(&profile).unwrap();
        std::fs::create_dir_all(&downloads).unwrap();

        // Port 0: chromedriver picks a free port and says which on its standard output.
        let mut driver = Command::new(&chromedriver)
            .args(["--port=0", "--log-level=WARNING"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", chromedriver.display()));
        let driver_log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = driver.stdout.take().unwrap();
        let log = driver_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(port.parse::<u16>().ok());
                }
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        let stderr = driver.stderr.take().unwrap();
        let log = driver_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        let started = Instant::now();
        let port = loop {
            match rx.try_recv() {
                Ok(Some(port)) => break port,
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    panic!(
                        "chromedriver did not start:\n{}",
                        driver_log.lock().unwrap()
                    );
                }
                Err(mpsc::TryRecvError::Empty) if started.elapsed() > TIMEOUT => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    panic!(
                        "chromedriver did not say its port within {TIMEOUT:?}:\n{}",
                        driver_log.lock().unwrap()
                    );
                }
                Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(POLL).await,
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if started.elapsed() > TIMEOUT {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!("chromedriver does not accept connections on {addr}");
            }
            tokio::time::sleep(POLL).await;
        }
        let driver_url = format!("http://{addr}");

        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size=1280,{WINDOW_HEIGHT}"));
        let capabilities = json!({
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": TIMEOUT.as_millis(), "script": TIMEOUT.as_millis()},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
                // Downloads land in our directory, without a prompt (headless has no
                // prompt to answer), and no password manager looks at the sign-in form.
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "credentials_enable_service": false,
                    "profile.password_manager_enabled": false,
                    "profile.password_manager_leak_detection": false,
                },
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connected =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&driver_url)
                .await;
        let client = match connected {
            Ok(client) => client,
            Err(error) => {
                let _ = driver.kill();
                let _ = driver.wait();
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "chromedriver could not start {}: {error}\n{}",
                    chromium.display(),
                    driver_log.lock().unwrap()
                );
            }
        };
        let session_id = client.session_id().await.ok().flatten();
        let browser_pid = client
            .capabilities()
            .and_then(|c| c.get("goog:processID"))
            .and_then(Value::as_u64);
        let browser = Browser {
            client,
            driver,
            driver_url,
            session_id,
            browser_pid,
            dir,
            closed: false,
        };
        browser.set_window_size(1280, WINDOW_HEIGHT).await;
        Some(browser)
    }

    /// The WebDriver client itself, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Where the browser saves downloads (see [`Browser::downloaded`]).
    pub fn download_dir(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(mut self) {
        let closed = tokio::time::timeout(TIMEOUT, self.client.clone().close()).await;
        self.closed = matches!(closed, Ok(Ok(())));
    }

    /// The page's visible text (`document.body.innerText`), for failure messages and
    /// for assertions about the whole page.
    pub async fn page_text(&self) -> String {
        self.execute(
            "return document.body ? document.body.innerText : '';",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Opens `url` and waits for its load event.
    pub async fn goto(&self, url: &str) {
        if let Err(error) = self.client.goto(url).await {
            let context = self.context().await;
            panic!("could not open {url}: {error}\n{context}");
        }
    }

    /// The page's title.
    pub async fn title(&self) -> String {
        self.client.title().await.unwrap()
    }

    /// Resizes the window to `px` × 900: the viewport is `px` wide (a phone is 360).
    pub async fn set_width(&self, px: u32) {
        self.set_window_size(px, WINDOW_HEIGHT).await;
    }

    /// Resizes the window (its height includes about 140 px of invisible frame).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .unwrap_or_else(|e| panic!("could not resize the window to {width}×{height}: {e}"));
    }

    /// The first displayed element matching `css`, once there is one.
    pub async fn wait_for(&self, css: &str) -> Element {
        self.poll(&format!("a visible {css}"), async || {
            self.first_displayed(css).await
        })
        .await
    }

    /// Waits until some displayed element matching `css` has a text containing
    /// `needle`; returns that text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        self.poll(&format!("{css} with the text {needle:?}"), async || {
            for element in self.client.find_all(Locator::Css(css)).await? {
                let text = element.text().await?;
                if text.contains(needle) {
                    return Ok(Some(text));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Waits until no element matching `css` is displayed (absent or hidden).
    pub async fn wait_gone(&self, css: &str) {
        self.poll(&format!("{css} to disappear"), async || {
            Ok(self.first_displayed(css).await?.is_none().then_some(()))
        })
        .await;
    }

    /// The visible text of the first displayed element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.poll(&format!("the text of {css}"), async || {
            match self.first_displayed(css).await? {
                Some(element) => Ok(Some(element.text().await?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Clears the first displayed field matching `css` and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        self.poll(&format!("to fill {css}"), async || {
            let Some(field) = self.first_displayed(css).await? else {
                return Ok(None);
            };
            field.clear().await?;
            field.send_keys(text).await?;
            Ok(Some(()))
        })
        .await;
    }

    /// Clicks the first displayed, enabled element matching `css` (retrying while
    /// something covers it or the page re-renders it).
    pub async fn click(&self, css: &str) {
        self.poll(&format!("to click {css}"), async || {
            let Some(element) = self.first_displayed(css).await? else {
                return Ok(None);
            };
            if !element.is_enabled().await? {
                return Ok(None);
            }
            element.click().await?;
            Ok(Some(()))
        })
        .await;
    }

    /// Clicks the first displayed, enabled element matching `css` whose visible text
    /// contains `text` (`click_text("button", "Sign in")`).
    pub async fn click_text(&self, css: &str, text: &str) {
        self.poll(
            &format!("to click the {css} reading {text:?}"),
            async || {
                for element in self.client.find_all(Locator::Css(css)).await? {
                    if element.is_displayed().await?
                        && element.is_enabled().await?
                        && element.text().await?.contains(text)
                    {
                        element.click().await?;
                        return Ok(Some(()));
                    }
                }
                Ok(None)
            },
        )
        .await;
    }

    /// Chooses the option whose value is `value` in the first displayed `<select>`
    /// matching `css` (the page gets its `input` and `change` events).
    pub async fn select(&self, css: &str, value: &str) {
        self.poll(&format!("to choose {value:?} in {css}"), async || {
            let Some(select) = self.first_displayed(css).await? else {
                return Ok(None);
            };
            select.select_by_value(value).await?;
            let chosen = select.prop("value").await?;
            Ok((chosen.as_deref() == Some(value)).then_some(()))
        })
        .await;
    }

    /// Gives the `<input type="file">` matching `css` (hidden or not) the local file
    /// at `path`, as if chosen in the file dialog.
    pub async fn upload(&self, css: &str, path: &Path) {
        let path = std::fs::canonicalize(path)
            .unwrap_or_else(|e| panic!("no file to upload at {}: {e}", path.display()));
        let path = path.to_str().unwrap().to_owned();
        self.poll(&format!("to upload {path} into {css}"), async || {
            let Some(input) = self
                .client
                .find_all(Locator::Css(css))
                .await?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            input.send_keys(&path).await?;
            Ok(Some(()))
        })
        .await;
    }

    /// Runs `js` as a function body in the page (`arguments[0]`… are `args`; elements
    /// serialize as elements) and returns what it returns.
    pub async fn execute(&self, js: &str, args: Vec<Value>) -> Value {
        match self.client.execute(js, args).await {
            Ok(value) => value,
            Err(error) => {
                let page = self.page_text_briefly().await;
                panic!("script failed: {error}\n--- script ---\n{js}\n--- page ---\n{page}");
            }
        }
    }

    /// Saves what the viewport shows to `tests/screenshots/<name>.png`; returns the path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("could not take the screenshot {name}: {e}"));
        save_screenshot(name, &png)
    }

    /// Like [`Browser::screenshot`], of the whole page: the window grows to the page's
    /// height for the shot (at most 8000 px), then returns to its size.
    pub async fn screenshot_full(&self, name: &str) -> PathBuf {
        let (width, height) = self.client.get_window_size().await.unwrap();
        let sizes = self
            .execute(
                "return [document.documentElement.scrollHeight, window.innerHeight];",
                vec![],
            )
            .await;
        let page = sizes[0].as_u64().unwrap_or(height);
        let viewport = sizes[1].as_u64().unwrap_or(height);
        let frame = height.saturating_sub(viewport);
        let tall = (page + frame).clamp(height, 8000);
        let (width, height) = (
            u32::try_from(width).unwrap(),
            u32::try_from(height).unwrap(),
        );
        self.set_window_size(width, u32::try_from(tall).unwrap())
            .await;
        let path = self.screenshot(name).await;
        self.set_window_size(width, height).await;
        path
    }

    /// The bytes of a finished download named `name` (any name: `None`), waiting up to
    /// `timeout` for it. The file is removed once read, so the next download of the
    /// same name is awaited afresh.
    pub async fn downloaded(&self, name: Option<&str>, timeout: Duration) -> Vec<u8> {
        self.downloaded_file(name, timeout).await.1
    }

    /// Like [`Browser::downloaded`]; also returns the file's name.
    pub async fn downloaded_file(
        &self,
        name: Option<&str>,
        timeout: Duration,
    ) -> (String, Vec<u8>) {
        let dir = self.download_dir();
        let started = Instant::now();
        loop {
            // Chromium writes `<name>.crdownload` (or a hidden temporary file) and
            // renames it to its final name once complete.
            let mut finished: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let file = entry.file_name().to_string_lossy().into_owned();
                    let meta = entry.metadata().ok()?;
                    let complete = meta.is_file()
                        && !file.starts_with('.')
                        && !file.ends_with(".crdownload")
                        && name.is_none_or(|n| n == file);
                    if !complete {
                        return None;
                    }
                    Some((meta.modified().ok()?, file))
                })
                .collect();
            finished.sort();
            if let Some((_, file)) = finished.into_iter().next() {
                let path = dir.join(&file);
                let bytes = std::fs::read(&path).unwrap();
                std::fs::remove_file(&path).unwrap();
                return (file, bytes);
            }
            if started.elapsed() > timeout {
                let present: Vec<String> = std::fs::read_dir(&dir)
                    .unwrap()
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                let context = self.context().await;
                panic!(
                    "no download {} within {timeout:?} (the directory holds {present:?})\n{context}",
                    name.unwrap_or("(any name)")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first displayed element matching `css`.
    async fn first_displayed(&self, css: &str) -> Result<Option<Element>, CmdError> {
        for element in self.client.find_all(Locator::Css(css)).await? {
            if element.is_displayed().await? {
                return Ok(Some(element));
            }
        }
        Ok(None)
    }

    /// Asks `probe` every 50 ms until it answers `Some`, for up to [`TIMEOUT`]. Errors
    /// (an element re-rendered away, a click on a covered button) count as "not yet":
    /// the page of a single-page app changes under the test's feet.
    async fn poll<T>(
        &self,
        what: &str,
        mut probe: impl AsyncFnMut() -> Result<Option<T>, CmdError>,
    ) -> T {
        let started = Instant::now();
        let mut last_error = None;
        loop {
            match probe().await {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(error) => last_error = Some(error),
            }
            if started.elapsed() > TIMEOUT {
                let error = last_error.map_or_else(String::new, |e| format!(" (last error: {e})"));
                let context = self.context().await;
                panic!("waited {TIMEOUT:?} for {what}{error}\n{context}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Where the browser is and what it shows, for a failure message.
    async fn context(&self) -> String {
        let url = tokio::time::timeout(Duration::from_secs(5), self.client.current_url())
            .await
            .ok()
            .and_then(Result::ok)
            .map_or_else(|| "(unknown)".to_owned(), |u| u.to_string());
        let page = self.page_text_briefly().await;
        format!("--- page at {url} ---\n{page}\n--- end of page ---")
    }

    /// The page's text, or why it could not be read (a hung page must not hang the
    /// failure message too).
    async fn page_text_briefly(&self) -> String {
        let script = "return document.body ? document.body.innerText : '';";
        match tokio::time::timeout(Duration::from_secs(5), self.client.execute(script, vec![]))
            .await
        {
            Ok(Ok(Value::String(text))) => text,
            Ok(Ok(other)) => format!("(no text: {other})"),
            Ok(Err(error)) => format!("(could not read the page: {error})"),
            Err(_) => "(the page did not answer within 5 s)".to_owned(),
        }
    }

    /// Ends the WebDriver session without a runtime (Drop may run while a failed test
    /// unwinds): one blocking `DELETE /session/{id}` to chromedriver.
    fn delete_session_blocking(&self) -> bool {
        let Some(id) = &self.session_id else {
            return false;
        };
        let Some(addr) = self.driver_url.strip_prefix("http://") else {
            return false;
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return false;
        };
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{id} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        // chromedriver keeps the connection open: the status line is the answer (it
        // deletes the session before it replies).
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 200")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.closed && !self.delete_session_blocking() {
            // Chromium outlives a killed chromedriver: end it by its process id.
            if let Some(pid) = self.browser_pid {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `png` to `tests/screenshots/<name>.png`.
fn save_screenshot(name: &str, png: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    path
}

#[actix_rt::test]
async fn the_sign_in_page_opens_in_headless_chromium() {
    let Some(app) = TestApp::start(Backend::Sqlite).await else {
        return;
    };
    let Some(browser) = Browser::start().await else {
        app.stop().await;
        return;
    };
    browser.goto(&app.server.url("/")).await;
    browser.wait_for("#phone").await;
    assert_eq!(browser.title().await, "AfyaChain");
    browser.fill("#phone", "0712 345 678").await;
    browser.fill("#phone", "0722000111").await;
    let typed = browser
        .execute("return document.querySelector('#phone').value;", vec![])
        .await;
    assert_eq!(typed, "0722000111");

    browser.select("#lang", "sw").await;
    browser.wait_text("h1", "Ingia").await;

    browser.set_width(360).await;
    let width = browser.execute("return window.innerWidth;", vec![]).await;
    assert_eq!(width, 360);
    let shot = browser.screenshot("signin-360").await;
    assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"));

    // The app saves records the same way: a link to a blob with a `download` name,
    // clicked from script.
    let bytes: Vec<u8> = (0..=255u8)
        .chain(b"AfyaChain \xe2\x9c\x93\n".iter().copied())
        .collect();
    browser
        .execute(
            r#"const bytes = new Uint8Array(arguments[0]);
               const link = document.createElement("a");
               link.href = URL.createObjectURL(new Blob([bytes], {type: "application/octet-stream"}));
               link.download = "record.bin";
               document.body.appendChild(link);
               link.click();
               link.remove();"#,
            vec![json!(bytes)],
        )
        .await;
    let got = browser
        .downloaded(Some("record.bin"), Duration::from_secs(10))
        .await;
    assert_eq!(got, bytes);

    // A file input receives a local file as if chosen in the file dialog.
    let file = std::env::temp_dir().join(format!("afya-upload-{}.txt", uuid::Uuid::new_v4()));
    std::fs::write(&file, b"lab result").unwrap();
    browser
        .execute(
            r#"const input = document.createElement("input");
               input.type = "file";
               input.id = "harness-file";
               input.hidden = true;
               document.body.appendChild(input);"#,
            vec![],
        )
        .await;
    browser.upload("#harness-file", &file).await;
    let chosen = browser
        .execute(
            "const f = document.querySelector('#harness-file').files[0]; return [f.name, f.size];",
            vec![],
        )
        .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(chosen[0], file.file_name().unwrap().to_str().unwrap());
    assert_eq!(chosen[1], 10);

    browser.close().await;
    app.stop().await;
}
