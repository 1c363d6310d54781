//! The locks that make one instance of each named consumer or worker the active one.
//!
//! On PostgreSQL a lock is a session advisory lock, and every lock a process holds is
//! on one shared connection ([`PgLocks`]), so a process holds its pools plus this one
//! connection and the notifier's, however many consumers it runs. On SQLite a lock is
//! a lock file beside the database.
//!
//! Advisory locks are re-entrant within a session, so the shared session also keeps
//! the names it holds: a second taker in the same process is refused, as it would be
//! from another process. When the session's connection is lost, PostgreSQL has
//! released all of its locks; the session then starts a new epoch, and every lock of
//! the old one reports itself dead ([`ConsumerLock::is_alive`]) so its holder goes back
//! to standby and takes it again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;

use crate::store::{Store, StoreConfig, Typed};

/// How long one statement on the lock session may take before the session is
/// presumed lost (and with it every lock it held).
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`ConsumerLock::is_held`] asks the lock's session whether it is up (in
/// between, the session's epoch, read without a query, tells).
const ASK_EVERY: Duration = Duration::from_secs(10);
/// How long asking the session may take before the lock counts as lost.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// The right to be the one active instance of a named consumer. Dropping it releases
/// it; [`ConsumerLock::release`] does so at once.
pub struct ConsumerLock {
    guard: LockGuard,
    /// When the session was last asked whether it is up.
    asked: Instant,
}

enum LockGuard {
    Postgres(PgHeld),
    File(std::fs::File),
}

/// One advisory lock held on the shared session.
struct PgHeld {
    locks: Arc<PgLocks>,
    name: String,
    epoch: u64,
    released: bool,
}

impl Drop for PgHeld {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Unlocking needs the session, which is async: queue it, and flush the queue
        // now if a runtime is at hand (otherwise the session's next use does).
        self.locks.queue_unlock(self.name.clone(), self.epoch);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let locks = self.locks.clone();
            runtime.spawn(async move {
                let mut session = locks.session.lock().await;
                locks.flush(&mut session).await;
            });
        }
    }
}

/// The one PostgreSQL session a process holds its advisory locks on.
///
/// Every operation on it runs in a task of its own, which the caller awaits: a caller
/// that gives up waiting (a timeout, a shutdown) does not cut an operation off halfway,
/// so what the session holds and what it believes it holds never part.
pub(crate) struct PgLocks {
    url: String,
    session: Mutex<Session>,
    /// The session's epoch, readable without waiting for it (see `is_current`).
    epoch: AtomicU64,
    /// Names held in the current epoch.
    held: StdMutex<HashSet<String>>,
    /// Locks dropped without being released, to unlock on the next use.
    pending: StdMutex<Vec<(String, u64)>>,
}

#[derive(Default)]
struct Session {
    conn: Option<PgConnection>,
    epoch: u64,
}

impl PgLocks {
    pub(crate) fn new(url: String) -> Arc<PgLocks> {
        Arc::new(PgLocks {
            url,
            session: Mutex::new(Session::default()),
            epoch: AtomicU64::new(0),
            held: StdMutex::new(HashSet::new()),
            pending: StdMutex::new(Vec::new()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<(String, u64)>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue_unlock(&self, name: String, epoch: u64) {
        self.pending().push((name, epoch));
    }

    /// The session was lost: PostgreSQL released all its locks.
    fn lose(&self, session: &mut Session) {
        if let Some(conn) = session.conn.take() {
            drop(conn);
        }
        session.epoch += 1;
        self.epoch.store(session.epoch, Ordering::SeqCst);
        self.held().clear();
    }

    async fn connection<'s>(
        &self,
        session: &'s mut Session,
    ) -> anyhow::Result<&'s mut PgConnection> {
        if session.conn.is_none() {
            let conn = tokio::time::timeout(SESSION_TIMEOUT, PgConnection::connect(&self.url))
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))
                .and_then(|r| r.map_err(anyhow::Error::from))
                .context("connecting the consumer-lock session")?;
            session.conn = Some(conn);
        }
        session
            .conn
            .as_mut()
            .context("the consumer-lock session has no connection")
    }

    /// Runs one statement on the session; a failure loses the session.
    async fn run(
        &self,
        session: &mut Session,
        sql: &str,
        name: Option<&str>,
    ) -> anyhow::Result<bool> {
        let conn = match self.connection(session).await {
            Ok(conn) => conn,
            Err(e) => {
                self.lose(session);
                return Err(e);
            }
        };
        let mut query = sqlx::query_scalar::<_, bool>(sql);
        if let Some(name) = name {
            query = query.bind(lock_key(name));
        }
        match tokio::time::timeout(SESSION_TIMEOUT, query.fetch_one(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.lose(session);
                Err(anyhow::Error::from(e).context("on the consumer-lock session"))
            }
            Err(_) => {
                self.lose(session);
                anyhow::bail!("the consumer-lock session did not answer")
            }
        }
    }

    /// Unlocks what was dropped without a release, if still of this epoch, one at a
    /// time (each leaves the queue only once it is done).
    async fn flush(&self, session: &mut Session) {
        loop {
            let next = self.pending().last().cloned();
            let Some((name, epoch)) = next else {
                return;
            };
            self.unlock(session, &name, epoch).await;
            let mut pending = self.pending();
            if let Some(i) = pending.iter().rposition(|p| p.0 == name && p.1 == epoch) {
                pending.remove(i);
            }
        }
    }

    async fn unlock(&self, session: &mut Session, name: &str, epoch: u64) {
        if epoch != session.epoch || session.conn.is_none() {
            return;
        }
        match self
            .run(
                session,
                "SELECT pg_advisory_unlock(hashtextextended($1, 4471))",
                Some(name),
            )
            .await
        {
            Ok(_) => {
                self.held().remove(name);
            }
            // The session is gone, and the lock with it.
            Err(e) => {
                tracing::debug!(lock = name, error = %e, "consumer lock released with its session")
            }
        }
    }

    async fn try_take(self: Arc<Self>, name: String) -> anyhow::Result<Option<PgHeld>> {
        let mut session = self.session.lock().await;
        self.flush(&mut session).await;
        if self.held().contains(&name) {
            return Ok(None);
        }
        let locked = self
            .run(
                &mut session,
                "SELECT pg_try_advisory_lock(hashtextextended($1, 4471))",
                Some(&name),
            )
            .await
            .context("taking a consumer lock")?;
        if !locked {
            return Ok(None);
        }
        self.held().insert(name.clone());
        let epoch = session.epoch;
        drop(session);
        Ok(Some(PgHeld {
            locks: self.clone(),
            name,
            epoch,
            released: false,
        }))
    }

    async fn is_alive(self: Arc<Self>, epoch: u64) -> bool {
        let mut session = self.session.lock().await;
        self.flush(&mut session).await;
        if epoch != session.epoch || session.conn.is_none() {
            return false;
        }
        self.run(&mut session, "SELECT true", None).await.is_ok()
    }

    async fn release(self: Arc<Self>, name: String, epoch: u64) {
        let mut session = self.session.lock().await;
        self.flush(&mut session).await;
        self.unlock(&mut session, &name, epoch).await;
    }
}

/// Runs `work` in a task of its own and waits for it: cancelling the wait leaves the
/// work to finish.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| anyhow::anyhow!("a consumer-lock task failed: {e}"))
}

fn lock_key(name: &str) -> String {
    format!("afyachain consumer {name}")
}

impl ConsumerLock {
    /// Takes the lock named `name` if no other instance holds it.
    pub async fn try_take(store: &Store, name: &str) -> anyhow::Result<Option<ConsumerLock>> {
        let guard = match (&store.typed, store.config(), store.locks()) {
            (Typed::Postgres(_), StoreConfig::Postgres { .. }, Some(locks)) => {
                match detached(locks.clone().try_take(name.to_owned())).await?? {
                    Some(held) => LockGuard::Postgres(held),
                    None => return Ok(None),
                }
            }
            (Typed::Sqlite(_), StoreConfig::Sqlite { path }, _) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(lock_path(path, name))
                    .context("opening a consumer lock file")?;
                match file.try_lock() {
                    Ok(()) => LockGuard::File(file),
                    Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(e).context("locking a consumer lock file")
                    }
                }
            }
            _ => anyhow::bail!("store configuration does not match its pool"),
        };
        Ok(Some(ConsumerLock {
            guard,
            asked: Instant::now(),
        }))
    }

    /// Whether this instance still holds the lock: by the session's epoch
    /// ([`ConsumerLock::is_current`]), and every ten seconds by asking the session
    /// ([`ConsumerLock::confirm`]), since a process whose locks alone use the session
    /// would otherwise not notice it was lost. Cheap enough between any two steps.
    pub async fn is_held(&mut self) -> bool {
        if self.asked.elapsed() >= ASK_EVERY {
            self.confirm().await
        } else {
            self.is_current()
        }
    }

    /// Asks the lock's session now whether it is up ([`ConsumerLock::is_alive`]);
    /// no answer in time counts as lost. For a step that must never run in two
    /// instances at once.
    pub async fn confirm(&mut self) -> bool {
        self.asked = Instant::now();
        matches!(
            tokio::time::timeout(ASK_TIMEOUT, self.is_alive()).await,
            Ok(true)
        )
    }

    /// Whether the lock still holds: on PostgreSQL, whether the session it was taken
    /// on is still up (a lost session has released the advisory lock to another
    /// instance).
    pub async fn is_alive(&mut self) -> bool {
        match &self.guard {
            LockGuard::Postgres(held) => detached(held.locks.clone().is_alive(held.epoch))
                .await
                .unwrap_or(false),
            LockGuard::File(_) => true,
        }
    }

    /// Whether the session the lock was taken on is, as far as this process knows,
    /// still the one it holds (no query: a session seen lost makes this false at once).
    pub fn is_current(&self) -> bool {
        match &self.guard {
            LockGuard::Postgres(held) => held.locks.epoch.load(Ordering::SeqCst) == held.epoch,
            LockGuard::File(_) => true,
        }
    }

    pub async fn release(self) {
        match self.guard {
            LockGuard::Postgres(mut held) => {
                // The release runs to its end in its own task, even if this wait is
                // cancelled: the guard must not queue a second unlock, which could
                // release a later take of the same name.
                held.released = true;
                let _ = detached(held.locks.clone().release(held.name.clone(), held.epoch)).await;
            }
            LockGuard::File(file) => {
                let _ = file.unlock();
            }
        }
    }
}

fn lock_path(db_path: &std::path::Path, name: &str) -> std::path::PathBuf {
    let mut file = db_path.as_os_str().to_owned();
    file.push(format!(
        ".consumer-{}.lock",
        crate::consumer::safe_token(name)
    ));
    std::path::PathBuf::from(file)
}
