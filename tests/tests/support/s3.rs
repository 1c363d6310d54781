//! A real, independently written S3 server for the storage tests: `s3s-fs`, installed
//! by `scripts/tools` (which `scripts/test` runs). It checks AWS Signature V4 and keeps
//! each object as a plain file under `<root>/<bucket>/<key>`, so a test can look at
//! (or tamper with) exactly what left the machine.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AFYATESTACCESSKEY";

/// The server binary: `AFYA_S3S_FS`, or where `scripts/tools` installs it.
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("AFYA_S3S_FS") {
        return PathBuf::from(path);
    }
    let tools = std::env::var("AFYA_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/afyachain/tools")
        });
    let path = tools.join("s3s-fs-0.14.1/bin/s3s-fs");
    assert!(
        path.exists(),
        "s3s-fs is not installed at {}: run scripts/tools (scripts/test does)",
        path.display()
    );
    path
}

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub root: PathBuf,
    pub bucket: String,
    /// Generated per server: no fixed secret in the repository.
    pub secret_key: String,
}

impl S3Server {
    /// Starts a server on a free loopback port with one empty bucket.
    pub fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = std::env::temp_dir().join(format!("afya-s3-{}", uuid::Uuid::new_v4()));
        let bucket = "afya-records".to_owned();
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let mut server = S3Server {
            child: None,
            port,
            root,
            bucket,
            secret_key: uuid::Uuid::new_v4().simple().to_string(),
        };
        server.resume();
        server
    }

    /// Starts the server again on the same port and data (after [`S3Server::stop`]).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", &self.secret_key])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            if let Some(child) = self.child.as_mut() {
                let exited = child.try_wait().unwrap();
                assert!(
                    exited.is_none(),
                    "s3s-fs exited ({exited:?}): port {} taken?",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server: it stops answering at once.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables that point `afyachain` at this server.
    pub fn vars(&self) -> Vec<(String, String)> {
        self.vars_with_secret(&self.secret_key)
    }

    pub fn vars_with_secret(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("AFYA_BLOB_STORE", "s3".to_owned()),
            ("AFYA_S3_ENDPOINT", self.endpoint()),
            ("AFYA_S3_BUCKET", self.bucket.clone()),
            ("AFYA_S3_REGION", "us-east-1".to_owned()),
            ("AFYA_S3_ACCESS_KEY", ACCESS_KEY.to_owned()),
            ("AFYA_S3_SECRET_KEY", secret.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Where the server keeps the object of a blob.
    pub fn object_path(&self, sha256: &str) -> PathBuf {
        self.root.join(&self.bucket).join("blobs").join(sha256)
    }

    /// Every object in the bucket: (key, bytes).
    pub fn objects(&self) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        let dir = self.root.join(&self.bucket).join("blobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return found;
        };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                found.push((
                    format!("blobs/{}", entry.file_name().to_string_lossy()),
                    std::fs::read(entry.path()).unwrap(),
                ));
            }
        }
        found.sort();
        found
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
