//! Starting the real `afyachain` binary against a fresh store.

#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub mod pg;
pub mod s3;
pub mod zksync;

use eventstore::testing::fresh_config;
use eventstore::{Backend, StoreConfig};

/// The `afyachain` binary (the tests crate builds it with the same entry point).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_afyachain-under-test"))
}

/// Whether `program --version` runs. When it does not, a test skips outside CI and
/// fails in CI, where `why` says who installs it.
pub fn installed(program: &str, why: &str) -> bool {
    let installed = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            !eventstore::testing::in_ci(),
            "{program} is not installed ({why})"
        );
        eprintln!("SKIPPED: {program} is not installed");
    }
    installed
}

/// The end-to-end tests run two at a time (`scripts/test`): every test that starts a
/// server takes a shared slot; a test whose assertions are timings or that loads the
/// whole machine is marked `#[ignore = "alone: …"]`, which `scripts/test` runs in a
/// second pass, one at a time, and calls [`alone`] first, so that it runs with no
/// other beside it however it is run (`cargo test -- --include-ignored` too).
static SLOTS: RwLock<()> = RwLock::new(());

/// A test's slot, held by its thread until the test ends (each test runs on a thread
/// of its own, whose thread-locals are dropped as it ends).
struct Slot {
    guard: Guard,
    since: Instant,
    /// The test's name (libtest names each test's thread after the test).
    test: String,
}

enum Guard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

impl Slot {
    fn new(guard: Guard) -> Slot {
        Slot {
            guard,
            since: Instant::now(),
            test: std::thread::current().name().unwrap_or("?").to_owned(),
        }
    }

    fn alone(&self) -> bool {
        matches!(self.guard, Guard::Alone(_))
    }
}

/// With `AFYA_TEST_TIMES` naming a file, each test that held a slot appends a line to
/// it as it ends: seconds held, `alone` or `shared`, the test's name. `scripts/test`
/// prints the slowest.
impl Drop for Slot {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("AFYA_TEST_TIMES") else {
            return;
        };
        let line = format!(
            "{:.1} {} {}\n",
            self.since.elapsed().as_secs_f64(),
            if self.alone() { "alone" } else { "shared" },
            self.test,
        );
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = std::io::Write::write_all(&mut file, line.as_bytes());
        }
    }
}

thread_local! {
    static SLOT: RefCell<Option<Slot>> = const { RefCell::new(None) };
}

/// Waits until no other test runs, and keeps the others waiting until this one ends.
/// Called first in the test, before it starts any server, and like every server start
/// on the test's own thread (a slot is held by the thread that takes it).
pub fn alone() {
    SLOT.with(|slot| {
        let mut slot = slot.borrow_mut();
        assert!(
            slot.as_ref().is_none_or(Slot::alone),
            "support::alone() must be called before the test starts a server"
        );
        if slot.is_none() {
            *slot = Some(Slot::new(Guard::Alone(
                SLOTS.write().unwrap_or_else(PoisonError::into_inner),
            )));
        }
    });
}

/// Takes a shared slot for the test on this thread, unless it holds one already.
fn beside_others() {
    SLOT.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some(Slot::new(Guard::Shared(
                SLOTS.read().unwrap_or_else(PoisonError::into_inner),
            )));
        }
    });
}

/// An environment for the binary: a data directory, and a database on PostgreSQL.
pub struct Env {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    admin_url: Option<String>,
    db_name: Option<String>,
}

impl Env {
    /// `None`: PostgreSQL unreachable outside CI (skip).
    pub async fn new(backend: Backend) -> Option<Env> {
        beside_others();
        let (config, admin_url, db_name, dir) = fresh_config(backend).await?;
        let data_dir = dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("afya-e2e-{}", uuid::Uuid::new_v4()))
        });
        std::fs::create_dir_all(&data_dir).unwrap();
        let database_url = match config {
            StoreConfig::Postgres { url } => Some(url),
            StoreConfig::Sqlite { .. } => None,
        };
        Some(Env {
            backend,
            data_dir,
            database_url,
            admin_url,
            db_name,
        })
    }

    /// An environment on an existing PostgreSQL database (a test's own cluster), which
    /// the test removes itself.
    pub fn on_postgres(url: String) -> Env {
        beside_others();
        let data_dir = std::env::temp_dir().join(format!("afya-e2e-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&data_dir).unwrap();
        Env {
            backend: Backend::Postgres,
            data_dir,
            database_url: Some(url),
            admin_url: None,
            db_name: None,
        }
    }

    /// Drops the test database and the data directory.
    pub async fn cleanup(self) {
        if let (Some(admin), Some(name)) = (&self.admin_url, &self.db_name) {
            eventstore::testing::drop_database(admin, name)
                .await
                .unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AFYA_DATA_DIR", &self.data_dir)
            .env("RUST_LOG", "info")
            // 18 connections instead of the defaults' 28: two tests at a time, some with
            // two servers each, stay under PostgreSQL's default 100 connections. The
            // read pool keeps its 12: every consumer's batch and API read shares it.
            .env("AFYA_PG_POOL_SIZE", "6")
            .env("AFYA_PG_READ_POOL_SIZE", "12");
        if let Some(url) = &self.database_url {
            cmd.env("DATABASE_URL", url);
        }
        cmd
    }

    /// Runs a one-shot subcommand with `input` on its standard input; returns
    /// (success, stdout, stderr).
    pub fn run_with_input(&self, args: &[&str], input: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a one-shot subcommand; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        self.run_with(args, &[])
    }

    /// Runs a one-shot subcommand with extra environment variables.
    pub fn run_with(&self, args: &[&str], vars: &[(String, String)]) -> (bool, String, String) {
        let out = self
            .command()
            .args(args)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `afyachain serve` on a random loopback port.
    pub fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    /// Starts `afyachain serve` with extra environment variables.
    pub fn serve_with(&self, vars: &[(&str, &str)]) -> Server {
        let mut child = self
            .command()
            .arg("serve")
            .env("AFYA_LISTEN", "127.0.0.1:0")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("addr=") {
                    let addr: String = line[i + 5..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = tx.send(addr);
                }
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }
}

/// A running server process.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited with success.
    pub fn terminate(mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("server did not stop within 30 s of SIGTERM");
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
