//! Storage: one diesel connection enum over SQLite and PostgreSQL, an r2d2 pool, embedded migrations, and the
//! helpers that run every query on the blocking pool. SQL that differs by backend lives only in this module.

pub mod deferred;
mod durable;
pub mod models;
mod pcache;
pub mod schema;
pub mod stamp;
mod txn;
mod walbuf;

use crate::config::{DatabaseKind, DatabaseSettings};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection};
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgresql");

#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection available")]
    Pool(#[from] r2d2::PoolError),
    #[error("no database connection available: {0}")]
    Unavailable(String),
    /// The database ended the transaction to settle a conflict with another ([`is_contention`]).
    #[error("the database ended the transaction to settle a conflict: {0}")]
    Contended(String),
    #[error("database query failed")]
    Query(#[source] diesel::result::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("database task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl DbError {
    /// The same failure told again, to each write of a batch that failed as a whole.
    fn restated(&self) -> Self {
        match self {
            DbError::Unavailable(why) => DbError::Unavailable(why.clone()),
            DbError::Contended(why) => DbError::Contended(why.clone()),
            DbError::Migration(why) => DbError::Migration(why.clone()),
            other => DbError::Migration(other.to_string()),
        }
    }
}

impl From<diesel::result::Error> for DbError {
    fn from(e: diesel::result::Error) -> Self {
        DbError::Query(e)
    }
}

/// Opens connections of the configured kind. It replaces diesel's `ConnectionManager` because the enum's derived
/// `establish` would try each backend in turn, and SQLite needs its URL turned into a path and its PRAGMAs set.
#[derive(Clone)]
pub struct Manager {
    kind: DatabaseKind,
    url: secrecy::SecretString,
    /// When any of its PostgreSQL connections last found its link lost ([`LinkWatch`]).
    link_lost_at: Arc<AtomicU64>,
}

impl ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConnection, r2d2::Error> {
        match &self.kind {
            DatabaseKind::Postgres => {
                prepare_libpq();
                let mut conn = PgConnection::establish(&libpq_url(self.url.expose_secret()))
                    .map_err(r2d2::Error::ConnectionError)?;
                conn.set_instrumentation(LinkWatch {
                    last_used: since_start(),
                    lost: false,
                    link_lost_at: self.link_lost_at.clone(),
                });
                Ok(DbConnection::Postgres(conn))
            }
            DatabaseKind::Sqlite { path } => {
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(r2d2::Error::ConnectionError)?;
                // WAL lets readers run beside the writer; FULL makes each commit durable before it is visible (the
                // group-commit writer's own connection commits with NORMAL instead, and is synced apart: [`durable`]).
                // Statement journals (a savepoint's undo) and temporary results stay in memory, not temporary files.
                conn.batch_execute(
                    "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(r2d2::Error::QueryError)
    }

    /// A connection left inside a transaction (a panic in the middle of one) must never be reused: its next
    /// "transaction" would only be a savepoint that never commits. Nor must a PostgreSQL connection whose link
    /// was lost ([`LinkWatch`]).
    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        use diesel::connection::{TransactionManager, TransactionManagerStatus};
        type Manager = <DbConnection as Connection>::TransactionManager;
        let in_transaction = match Manager::transaction_manager_status_mut(conn) {
            TransactionManagerStatus::Valid(v) => v.transaction_depth().is_some(),
            TransactionManagerStatus::InError => true,
        };
        in_transaction || link_watch(conn).is_some_and(|w| w.lost)
    }
}

/// How long a pooled PostgreSQL connection may sit unused before it is asked `SELECT 1` on its way out of the
/// pool. r2d2 asks on every checkout by default: a round trip before each request's queries, a third of a miss's
/// statements. A connection in use under load is not asked; one idle longer (PostgreSQL restarted meanwhile, a
/// firewall dropped the link) is, and is replaced if it does not answer.
const PING_IF_IDLE: Duration = Duration::from_secs(1);

/// What a PostgreSQL connection knows of its own link: when a statement last finished on it, and whether one
/// failed because the link was gone (diesel reports `ClosedConnection` once libpq sees the connection bad). A
/// loss is also told to the other connections of its [`Manager`]: PostgreSQL restarting ends them all, so each
/// used before it is asked `SELECT 1` before its next use.
struct LinkWatch {
    /// [`since_start`] when a statement last finished.
    last_used: u64,
    lost: bool,
    link_lost_at: Arc<AtomicU64>,
}

/// Nanoseconds since this process first asked: a clock that connections can share through an atomic.
fn since_start() -> u64 {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    START.elapsed().as_nanos() as u64
}

impl LinkWatch {
    /// Whether it must be asked `SELECT 1` before use: idle past [`PING_IF_IDLE`], or used last before another
    /// connection found the link lost.
    fn needs_ping(&self) -> bool {
        since_start().saturating_sub(self.last_used) >= PING_IF_IDLE.as_nanos() as u64
            || self.link_lost_at.load(Ordering::Relaxed) >= self.last_used
    }
}

impl diesel::connection::Instrumentation for LinkWatch {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if let diesel::connection::InstrumentationEvent::FinishQuery { error, .. } = event {
            self.last_used = since_start();
            if error.is_some_and(is_unreachable) {
                self.lost = true;
                self.link_lost_at
                    .fetch_max(self.last_used, Ordering::Relaxed);
            }
        }
    }
}

fn link_watch(conn: &mut DbConnection) -> Option<&mut LinkWatch> {
    match conn {
        DbConnection::Postgres(c) => c.instrumentation().downcast_mut::<LinkWatch>(),
        DbConnection::Sqlite(_) => None,
    }
}

/// Whether a connection may be used: a PostgreSQL connection idle past [`PING_IF_IDLE`] must answer `SELECT 1`
/// first. One that does not is marked lost, so that the pool (or the writer) drops it.
fn still_linked(conn: &mut DbConnection) -> bool {
    match link_watch(conn) {
        None => return true,
        Some(w) if w.lost => return false,
        Some(w) if !w.needs_ping() => return true,
        Some(_) => {}
    }
    if conn.batch_execute("SELECT 1").is_ok() {
        return true;
    }
    if let Some(w) = link_watch(conn) {
        w.lost = true;
    }
    false
}

/// A pooled connection that still reaches the database ([`still_linked`]); each one that does not is dropped
/// on the way, so after PostgreSQL restarts the pool fills again with new connections.
fn checkout(pool: &r2d2::Pool<Manager>) -> Result<r2d2::PooledConnection<Manager>, DbError> {
    for _ in 0..pool.max_size() {
        let mut conn = pool.get()?;
        if still_linked(&mut conn) {
            return Ok(conn);
        }
    }
    Ok(pool.get()?)
}

/// Whether a query's failure means the database could not be reached, rather than that the query was wrong.
pub fn is_unreachable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        e,
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _
        )
    )
}

/// Whether the database failed a statement to settle a conflict between transactions, which leaves nothing of the
/// transaction standing and lets the same write succeed a moment later: PostgreSQL's deadlock detection (SQLSTATE
/// 40P01, which diesel does not name: told by its message) and serialisation failures (40001), or SQLite's busy
/// timeout running out while another connection held the write lock.
pub fn is_contention(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        Error::DatabaseError(DatabaseErrorKind::Unknown, info) => {
            let message = info.message();
            message.starts_with("deadlock detected") || message.starts_with("database is locked")
        }
        _ => false,
    }
}

/// The database handle the rest of cpis uses: cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<Manager>,
    kind: DatabaseKind,
    /// SQLite allows one writer; taking this before a write transaction queues writers in-process instead of
    /// letting them fail on a busy database.
    write_lock: Arc<Mutex<()>>,
    /// The group-commit writer that `write` hands its transactions to.
    writer: std::sync::mpsc::SyncSender<Box<dyn WriteJob>>,
    /// Opens the per-thread read connections of [`Db::read`].
    manager: Manager,
    /// Dropped with the last handle, which stops the SQLite checkpointer.
    _checkpointer: Option<std::sync::mpsc::SyncSender<()>>,
    /// What the writer has committed, for the metrics.
    pub stats: WriterStats,
    /// On SQLite, how far the writer's commits are synced ([`durable`]): reads answered alone wait for it.
    durable: Option<Arc<durable::Durable>>,
    /// Tells this handle's per-thread read connections from another database's in the same process.
    id: u64,
}

/// Counts of the group-commit writer's work: the mean batch is `writes / batches`.
#[derive(Clone)]
pub struct WriterStats {
    /// Transactions the writer ran (each one commit, one fsync).
    pub batches: prometheus::IntCounter,
    /// Writes those transactions carried.
    pub writes: prometheus::IntCounter,
    /// Syncs of SQLite's WAL that made the writer's commits durable ([`durable`]), each covering every batch
    /// committed before it began.
    pub syncs: prometheus::IntCounter,
}

impl WriterStats {
    fn new() -> Self {
        let counter =
            |name: &str, help: &str| prometheus::IntCounter::new(name, help).expect("valid metric");
        Self {
            batches: counter(
                "db_write_batches_total",
                "Transactions committed by the group-commit writer",
            ),
            writes: counter(
                "db_writes_total",
                "Writes carried by the group-commit writer's transactions",
            ),
            syncs: counter(
                "db_wal_syncs_total",
                "Syncs of the SQLite WAL that made the writer's commits durable",
            ),
        }
    }
}

/// Most per-thread read connections a thread keeps (one per database it reads; tests open many).
const READERS_PER_THREAD: usize = 4;

thread_local! {
    /// This thread's SQLite read connections, by [`Db::id`].
    static READERS: std::cell::RefCell<Vec<(u64, DbConnection)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hands the calling thread's free memory back to the system: mimalloc keeps a thread's freed pages until that
/// thread allocates again or collects, and a thread that has just freed a page cache may not allocate for a while.
fn return_free_pages() {
    // SAFETY: mi_collect takes a flag and only returns memory that is already free.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Asks the group-commit writer to free its connection's page cache before a long write takes the write lock:
/// the long write's cache of [`LONG_WRITE_CACHE`] then takes the place of the writer's 64 MiB rather than
/// coming on top of it, and the server's resident set during an import stays where it was. The pages are freed
/// on the writer's own thread and handed back to the system there (mimalloc returns a thread's free pages when
/// that thread collects). The writer reads its pages back from the operating system's cache as it needs them.
/// The writer's metrics count it as a batch of one write.
struct ReleaseCache(std::sync::mpsc::SyncSender<()>);

impl WriteJob for ReleaseCache {
    fn run(self: Box<Self>, conn: &mut DbConnection) -> Completion {
        if let DbConnection::Sqlite(c) = conn {
            // Frees every page not in use; within the batch's transaction no page is dirty yet but those of
            // the writes before this one, which stay.
            let _ = c.batch_execute("PRAGMA shrink_memory;");
            return_free_pages();
        }
        let _ = self.0.send(());
        Box::new(|_| {})
    }

    fn fail(self: Box<Self>, _why: DbError) {
        let _ = self.0.send(());
    }
}

/// A write waiting for the group-commit writer: it runs inside the batch's transaction (in its own savepoint),
/// and learns after the commit whether it stands.
/// Told once the batch's commit is durable, or why it does not stand.
pub type Completion = Box<dyn FnOnce(Option<&DbError>) + Send>;

pub trait WriteJob: Send {
    fn run(self: Box<Self>, conn: &mut DbConnection) -> Completion;
    fn fail(self: Box<Self>, why: DbError);
}

struct TypedJob<T, E, F> {
    f: F,
    reply: tokio::sync::oneshot::Sender<Result<T, E>>,
    span: tracing::Span,
    /// Whether the write runs in a savepoint of its own (all but audit-only writes, which have nothing to undo).
    savepoint: bool,
}

impl<T, E, F> WriteJob for TypedJob<T, E, F>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<DbError> + From<diesel::result::Error> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &mut DbConnection) -> Completion {
        let TypedJob {
            f,
            reply,
            span,
            savepoint,
        } = *self;
        // A nested transaction is a savepoint: this job's failure undoes only this job, its buffered audit events
        // and rows ([`deferred`]) included.
        let mark = JobMark::now();
        let result = span.in_scope(|| {
            if savepoint {
                conn.transaction(f)
            } else {
                f(conn)
            }
        });
        if result.is_err() {
            mark.discard();
        }
        Box::new(move |commit_error| {
            let result = match commit_error {
                None => result,
                Some(e) => Err(E::from(e.restated())),
            };
            let _ = reply.send(result);
        })
    }

    fn fail(self: Box<Self>, why: DbError) {
        let _ = self.reply.send(Err(E::from(why)));
    }
}

/// What a write is told when its batch's transaction failed: unavailable if the database could not be reached,
/// contended if the database ended the batch to settle a conflict with another transaction (a deadlock with
/// another instance's batch); either way the write may be sent again.
fn batch_failure(e: &diesel::result::Error) -> DbError {
    if is_unreachable(e) {
        DbError::Unavailable(format!("the batch could not be committed: {e}"))
    } else if is_contention(e) {
        DbError::Contended(format!("the batch was not committed: {e}"))
    } else {
        DbError::Migration(format!("the batch commit failed: {e}"))
    }
}

/// How far the writer's batch had buffered audit events and rows ([`deferred`]) when a write began. A write that
/// fails has what it added dropped; so does one that gives up part way without failing (an attendance another
/// instance recorded at the same moment, `api::attendances`).
pub struct JobMark {
    audit: usize,
    rows: deferred::Mark,
}

impl JobMark {
    pub fn now() -> Self {
        Self {
            audit: crate::audit::batch_mark(),
            rows: deferred::mark(),
        }
    }

    pub fn discard(self) {
        crate::audit::batch_truncate(self.audit);
        deferred::truncate(self.rows);
    }
}

/// Most writes that wait together commit together: one transaction (and one fsync) for the lot.
const MAX_BATCH: usize = 256;

/// A write transaction that holds SQLite's write lock from its start (`BEGIN IMMEDIATE`; a plain transaction on
/// PostgreSQL). With a deferred `BEGIN`, a transaction that reads before it writes must upgrade to the write lock
/// mid-way, and SQLite answers "database is locked" at once, without waiting, if any other connection holds
/// that lock at that instant (a reader briefly takes it to re-read a WAL index header it caught half-written):
/// the whole batch would fail. Taking the lock at `BEGIN` waits for it, within the busy timeout, instead.
pub fn write_transaction<T, E, F>(conn: &mut DbConnection, f: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel::connection::TransactionManager;
    type Manager = <DbConnection as Connection>::TransactionManager;
    // On SQLite, `BEGIN IMMEDIATE` and `COMMIT` are statements kept prepared ([`txn`]), with the connection's
    // transaction depth kept in step: a write's savepoint inside nests as usual, and diesel's manager (which
    // hands every call to the backend's) rolls back either backend's transaction.
    match conn {
        DbConnection::Sqlite(_) => txn::begin::<{ txn::BEGIN_IMMEDIATE }>(conn)?,
        DbConnection::Postgres(_) => Manager::begin_transaction(conn)?,
    }
    match f(conn) {
        Ok(value) => {
            txn::commit(conn)?;
            Ok(value)
        }
        Err(e) => {
            Manager::rollback_transaction(conn)?;
            Err(e)
        }
    }
}

/// On SQLite, what the writer hands its committed batches to ([`durable`]).
type Syncer = (
    Arc<durable::Durable>,
    std::sync::mpsc::Sender<durable::Committed>,
);

fn writer_loop(
    manager: Manager,
    syncer: Option<Syncer>,
    write_lock: Arc<Mutex<()>>,
    jobs: std::sync::mpsc::Receiver<Box<dyn WriteJob>>,
    stats: WriterStats,
) {
    let sqlite = syncer.is_some();
    // The writer keeps one connection of its own: its page cache stays warm (no other connection commits to
    // SQLite in between, so the cache is never invalidated), and no pool checkout is paid per batch.
    let mut own: Option<DbConnection> = None;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let conn = match own
            .take()
            .and_then(|mut c| still_linked(&mut c).then_some(c))
            .map(Ok)
            .unwrap_or_else(|| writer_connection(&manager))
        {
            Ok(c) => own.insert(c),
            Err(e) => {
                for job in batch {
                    job.fail(DbError::Unavailable(e.to_string()));
                }
                continue;
            }
        };
        let _guard = sqlite.then(|| write_lock.lock().unwrap_or_else(|p| p.into_inner()));
        let mut number = None;
        stats.batches.inc();
        stats.writes.inc_by(batch.len() as u64);
        let mut completions = Vec::with_capacity(batch.len());
        crate::audit::begin_batch();
        deferred::begin();
        // A panic inside a write must not take the writer (and so every later write) down with it: the batch's
        // callers get an error, the connection is closed, and the writer carries on with a new one.
        let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_transaction(conn, |c| {
                for job in batch.drain(..) {
                    completions.push(job.run(c));
                }
                deferred::flush(c)?;
                crate::audit::end_batch(c)?;
                // Numbered just before its commit: a read that sees the commit ends after this.
                number = syncer.as_ref().map(|(d, _)| d.next_commit());
                Ok(())
            })
        }));
        crate::audit::abandon_batch();
        deferred::abandon();
        drop(_guard);
        let mut to_sync = Vec::new();
        match committed {
            Ok(result) => {
                let error = result.err().map(|e| batch_failure(&e));
                // A batch that failed as a whole (its commit, a lost connection) starts the next on a new one.
                if error.is_some() || manager.has_broken(conn) {
                    own = None;
                }
                match (&error, &syncer) {
                    // Committed on SQLite: answered once the syncer has synced the WAL.
                    (None, Some(_)) => to_sync = completions,
                    _ => {
                        for complete in completions {
                            complete(error.as_ref());
                        }
                    }
                }
                // Writes the transaction never reached (it could not begin: the connection was lost) fail
                // with its error rather than being dropped unanswered.
                for job in batch.drain(..) {
                    job.fail(error.as_ref().map_or_else(
                        || DbError::Migration("the batch's transaction could not begin".into()),
                        DbError::restated,
                    ));
                }
            }
            Err(_) => {
                own = None;
                tracing::error!("a write panicked; its batch was rolled back and its callers told")
            }
        }
        // Every number taken goes to the syncer, whether or not its commit succeeded, so that no read waits on
        // it for ever.
        if let (Some((_, to_syncer)), Some(number)) = (&syncer, number) {
            let batch = durable::Committed {
                number,
                completions: to_sync,
            };
            if let Err(lost) = to_syncer.send(batch) {
                // The syncer has stopped (it cannot, short of a panic): fail rather than leave writes unanswered.
                tracing::error!(
                    "the WAL syncer has stopped; the batch's writes are answered as failed"
                );
                let why = DbError::Unavailable("the WAL syncer has stopped".into());
                for complete in lost.0.completions {
                    complete(Some(&why));
                }
            }
        }
    }
}

/// A writing connection's SQLite page cache: 64 MiB.
const WRITER_CACHE: &str = "PRAGMA cache_size = -65536;";

/// How many WAL frames (4 KiB pages) the writer lets the WAL reach before it checkpoints in its own commit
/// (SQLite's default is 1,000): 128 MiB. Below that [`checkpointer_loop`] does the work off the writer. At
/// 32 MiB the writer still checkpointed itself often enough under load that a flag check's p99 was about
/// 31 ms at full size against 19 to 21 ms with 128 MiB (BENCHMARKS.md, change 33).
const WRITER_AUTOCHECKPOINT: &str = "PRAGMA wal_autocheckpoint = 32768;";

/// A long write's page cache: 128 MiB ([`Db::write_blocking`]). A bulk file's rows go into five indexes
/// (the person's NHS number, name and postcode keys and birth date, the plan's NHS number) in random order, and
/// at full size (1,200,000 persons) a 100,000-row file touches most of their leaves, about 250 MB. With 64 MiB,
/// SQLite wrote dirty pages out to the WAL in the middle of the transaction and read pages back from the
/// operating system, a fifth of the import (BENCHMARKS.md, change 54).
const LONG_WRITE_CACHE: &str = "PRAGMA cache_size = -131072;";

/// What a long write's connection does before it begins: copies the WAL left by the write before it into the
/// database, and leaves its own commit's pages to the next one or to [`checkpointer_loop`].
const LONG_WRITE_CHECKPOINT: &str =
    "PRAGMA wal_checkpoint(PASSIVE); PRAGMA wal_autocheckpoint = 0;";

/// The writer's own connection: on SQLite with a larger page cache than the readers' ([`WRITER_CACHE`]), since
/// every write's index pages pass through it; with checkpointing left to [`checkpointer_loop`] until the WAL
/// reaches [`WRITER_AUTOCHECKPOINT`]; and with its commits synced by the syncer ([`durable`]), not by SQLite in
/// the commit (`synchronous = NORMAL`). Only the writer's connection commits that way, and only because its
/// answers wait for the syncer.
fn writer_connection(manager: &Manager) -> Result<DbConnection, r2d2::Error> {
    let mut conn = manager.connect()?;
    if let DbConnection::Sqlite(c) = &mut conn {
        for setting in [
            WRITER_CACHE,
            WRITER_AUTOCHECKPOINT,
            "PRAGMA synchronous = NORMAL;",
        ] {
            c.batch_execute(setting).map_err(r2d2::Error::QueryError)?;
        }
    }
    Ok(conn)
}

/// How often the SQLite checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// When the WAL holds this many frames (64 MiB), the checkpointer makes it start over ([`checkpointer_loop`]).
#[cfg(not(test))]
const RESTART_FRAMES: i32 = 16_384;
/// Unit tests restart a small WAL, so that every test on a SQLite file runs the restart beside its writes.
#[cfg(test)]
const RESTART_FRAMES: i32 = 64;

/// How long the checkpointer's restart may wait for readers before it gives up until its next turn (SQLite's
/// busy timeout on the checkpointer's connection, in ms); writes wait meanwhile.
const RESTART_PATIENCE: &str = "PRAGMA busy_timeout = 20;";

/// Passive passes at most before a restart, each after the database file is synced ...
const CATCH_UP_PASSES: usize = 4;

/// ... until one copies fewer frames than this: what is left for the restart to copy while writes wait.
const CAUGHT_UP: i32 = 256;

#[derive(diesel::QueryableByName)]
struct CheckpointResult {
    /// Frames in the WAL.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    log: i32,
    /// Frames copied into the database file.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    checkpointed: i32,
}

/// Flushes the pages a passive checkpoint copied into the database file to disk, so that the restart's own sync
/// has only the few it copies itself. Through SQLite's own handle on the file ([`durable::Files`]): closing a
/// descriptor opened beside SQLite's would drop the process's locks on the database.
fn sync_database(files: &mut Option<durable::Files>, path: &std::path::Path) {
    if let Err(e) = durable::with_files(files, path, durable::Files::sync_database) {
        tracing::debug!(error = %e, "could not sync the database file before a restart");
    }
}

fn checkpoint(
    c: &mut SqliteConnection,
    mode: &str,
) -> Result<CheckpointResult, diesel::result::Error> {
    use diesel::RunQueryDsl;
    diesel::sql_query(format!("PRAGMA wal_checkpoint({mode})")).get_result(c)
}

/// Copies committed pages from SQLite's WAL into the database file, on its own connection, beside the writer
/// instead of inside its commits (a passive checkpoint never blocks the writer or readers). The profile showed
/// checkpoints, with their fsyncs, as an eighth of the writer's time.
///
/// The WAL only starts over from its beginning once everything in it has been copied and synced and no reader
/// still reads it, and a passive checkpoint under load never catches up with the writer. So once the WAL passes
/// [`RESTART_FRAMES`], passes alternate with syncs of the database file, while nothing waits, until they have
/// caught up with the writer ([`CAUGHT_UP`]); then a restart checkpoint under the write lock copies and syncs
/// only what was committed since and waits (at most [`RESTART_PATIENCE`]) for readers to move on. Writes wait
/// for the lock meanwhile, a few milliseconds. Before, the writer did all of this itself in a commit once the
/// WAL reached [`WRITER_AUTOCHECKPOINT`], copying and syncing up to a tenth of a second's pages while every write
/// waited: attendances' p99 was 58 to 81 ms on 300,000 persons, 36 to 37 ms with one pass and a sync before
/// the restart, and 21 to 22 ms with the catching up. The writer's limit stays, should the checkpointer fall
/// behind. Stops when the last [`Db`] handle is dropped.
fn checkpointer_loop(
    manager: Manager,
    write_lock: Arc<Mutex<()>>,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let DatabaseKind::Sqlite { path } = &manager.kind else {
        return;
    };
    let mut conn: Option<SqliteConnection> = None;
    let mut files: Option<durable::Files> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if conn.is_none() {
            conn = match manager.connect() {
                Ok(DbConnection::Sqlite(mut c)) => {
                    c.batch_execute(RESTART_PATIENCE).is_ok().then_some(c)
                }
                _ => None,
            };
        }
        let Some(c) = conn.as_mut() else { continue };
        let pass = checkpoint(c, "PASSIVE").and_then(|done| {
            if done.log < RESTART_FRAMES {
                return Ok(());
            }
            // Each catching-up pass copies what was committed during the one before, fewer pages each time.
            let mut copied = done.checkpointed;
            for _ in 0..CATCH_UP_PASSES {
                sync_database(&mut files, path);
                let again = checkpoint(c, "PASSIVE")?;
                let fresh = again.checkpointed - copied;
                copied = again.checkpointed;
                if fresh < CAUGHT_UP {
                    break;
                }
            }
            sync_database(&mut files, path);
            let _guard = write_lock.lock().unwrap_or_else(|p| p.into_inner());
            checkpoint(c, "RESTART").map(drop)
        });
        if let Err(e) = pass {
            tracing::debug!(error = %e, "background checkpoint failed; the writer checkpoints instead");
            conn = None;
        }
    }
}

impl Db {
    pub fn connect(settings: &DatabaseSettings) -> Result<Self, DbError> {
        configure_sqlite();
        let kind = settings
            .kind()
            .map_err(|e| DbError::Migration(e.to_string()))?;
        if let DatabaseKind::Sqlite { path } = &kind {
            create_parent_dir(path)
                .map_err(|e| DbError::Migration(format!("cannot create database folder: {e}")))?;
        }
        let manager = Manager {
            kind: kind.clone(),
            url: settings.url.clone(),
            link_lost_at: Arc::new(AtomicU64::new(0)),
        };
        fn cannot_open(e: impl std::fmt::Display) -> DbError {
            DbError::Migration(format!("cannot open the database: {e}"))
        }
        if matches!(kind, DatabaseKind::Sqlite { .. }) {
            // One connection first puts a new database file into WAL mode. The pool opens its connections
            // together, and on a file still in rollback mode each tries to change the mode: SQLite refuses all but
            // one at once, without waiting out the busy timeout, and r2d2 logged `database is locked` at ERROR
            // (4 of 40 first starts of `cpis migrate`) before it tried again.
            drop(manager.connect().map_err(cannot_open)?);
        }
        let pool = r2d2::Pool::builder()
            .max_size(settings.pool_size)
            // Only connections idle for a while are asked first ([`PING_IF_IDLE`], `Db::checkout`).
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(settings.connect_timeout_secs))
            .build(manager.clone())
            .map_err(cannot_open)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let write_lock = Arc::new(Mutex::new(()));
        let (writer, jobs) = std::sync::mpsc::sync_channel(4 * MAX_BATCH);
        let stats = WriterStats::new();
        let syncer = match &kind {
            DatabaseKind::Sqlite { path } => {
                let durable = Arc::new(durable::Durable::new());
                let to_sync = durable::spawn(durable.clone(), path.clone(), stats.syncs.clone())
                    .map_err(|e| DbError::Migration(format!("cannot start the WAL syncer: {e}")))?;
                Some((durable, to_sync))
            }
            DatabaseKind::Postgres => None,
        };
        let durable = syncer.as_ref().map(|(d, _)| d.clone());
        let sqlite = syncer.is_some();
        let (m, lock, counts) = (manager.clone(), write_lock.clone(), stats.clone());
        std::thread::Builder::new()
            .name("cpis-db-writer".into())
            .spawn(move || writer_loop(m, syncer, lock, jobs, counts))
            .map_err(|e| DbError::Migration(format!("cannot start the database writer: {e}")))?;
        let checkpointer = if sqlite {
            let (keep, stop) = std::sync::mpsc::sync_channel(0);
            let (m, lock) = (manager.clone(), write_lock.clone());
            std::thread::Builder::new()
                .name("cpis-db-checkpoint".into())
                .spawn(move || checkpointer_loop(m, lock, stop))
                .map_err(|e| {
                    DbError::Migration(format!("cannot start the database checkpointer: {e}"))
                })?;
            Some(keep)
        } else {
            None
        };
        Ok(Self {
            pool,
            kind,
            write_lock,
            writer,
            manager,
            _checkpointer: checkpointer,
            stats,
            durable,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self.kind, DatabaseKind::Sqlite { .. })
    }

    pub fn backend_name(&self) -> &'static str {
        if self.is_sqlite() {
            "sqlite"
        } else {
            "postgresql"
        }
    }

    /// Runs `f` with a pooled connection on the blocking pool, inside the caller's tracing span. Its result comes
    /// once what it could have read is durable ([`Db::settle`]).
    pub async fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let result = self.run_before_write(f).await;
        self.settle().await;
        result
    }

    /// [`Db::run`] without the wait, for a caller that answers only after a write of its own
    /// ([`Db::read_before_write`]).
    pub(crate) async fn run_before_write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                let mut conn = checkout(&pool)?;
                f(&mut conn)
            })
        })
        .await
        .map_err(DbError::from)?
    }

    /// Runs a short read (indexed lookups, no scans). On SQLite it runs at once, on this thread's own read
    /// connection: an indexed read in-process takes microseconds, less than handing it to another thread and
    /// back, which the profile of a loaded server showed as its largest cost. WAL readers never wait for the
    /// writer. On PostgreSQL, where every query is a network round trip, it runs on the blocking pool. Its
    /// result comes once what it could have read is durable ([`Db::settle`]).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let result = self.read_before_write(f).await;
        self.settle().await;
        result
    }

    /// Waits until every write committed before now is durable. On SQLite a commit is visible to readers a little
    /// before its WAL is synced ([`durable`]), so a result read alone waits for that sync before it is answered;
    /// on PostgreSQL a commit is durable before it is visible, and this returns at once.
    pub async fn settle(&self) {
        if let Some(durable) = &self.durable {
            durable.settle().await;
        }
    }

    /// [`Db::read`] without the wait for durability, for a caller that answers only after a write of its own:
    /// that write's answer waits for a sync, which covers every commit before it, and so whatever this read saw.
    /// The flag check and the attendance read this way (`mpi::resolve_then`).
    pub(crate) async fn read_before_write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        if !self.is_sqlite() {
            return self.run_before_write(f).await;
        }
        let taken = READERS.with(|r| {
            let mut r = r.borrow_mut();
            let at = r.iter().position(|(id, _)| *id == self.id)?;
            Some(r.swap_remove(at).1)
        });
        // Taken out while in use, so a read inside a read opens its own connection.
        let mut conn = match taken {
            Some(conn) => conn,
            None => self
                .manager
                .connect()
                .map_err(|e| DbError::Unavailable(e.to_string()))?,
        };
        // One read transaction for the lot: one snapshot, and SQLite checks once (not per statement) whether the
        // writer has committed since, which empties this connection's page cache.
        // `BEGIN` and `COMMIT` are statements kept prepared ([`txn`]). A read's own error still commits: there is
        // nothing to undo.
        let result = txn::begin::<{ txn::BEGIN }>(&mut conn).and_then(|()| {
            let result = f(&mut conn);
            txn::commit(&mut conn).map(|()| result)
        });
        let result = match result {
            Ok(result) => result,
            Err(e) => Err(E::from(DbError::Query(e))),
        };
        if !self.manager.has_broken(&mut conn) {
            READERS.with(|r| {
                let mut r = r.borrow_mut();
                if r.len() >= READERS_PER_THREAD {
                    r.remove(0);
                }
                r.push((self.id, conn));
            });
        }
        result
    }

    /// Runs `f` in one write transaction on the blocking pool. All writes that must commit together
    /// (a business row, its audit event, its outbox row) go through here.
    ///
    /// The transaction is handed to the group-commit writer, which runs the writes waiting at that moment
    /// together, each in its own savepoint, and commits them at once: durable audited writes at the rate of
    /// the database's commits times the batch size. A failing write undoes only itself.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        self.write_with(true, f).await
    }

    /// [`Db::write`] for a write that reads and only adds rows the writer holds until its batch commits (audit
    /// events, accesses, attendances on SQLite, notifications and their deliveries: [`deferred`]) and drops if
    /// the write fails: there is nothing for a savepoint to undo, so it runs without one (on PostgreSQL a
    /// savepoint is two round trips). Used by a check's audit event, a flag check that hits, and (through
    /// [`Db::write_with`]) most new attendances on SQLite; anything that updates, or inserts other rows, must
    /// use [`Db::write`].
    pub(crate) async fn write_buffered<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        self.write_with(false, f).await
    }

    /// [`Db::write`] when `savepoint`, else [`Db::write_buffered`]; called directly by a write that needs a
    /// savepoint only in some cases (an attendance that may teach the MPI a local identifier).
    pub(crate) async fn write_with<T, E, F>(&self, savepoint: bool, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Box::new(TypedJob {
            f,
            reply,
            span: tracing::Span::current(),
            savepoint,
        });
        // The channel is bounded: when it is full, waiting for room happens off the async threads.
        match self.writer.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                let writer = self.writer.clone();
                tokio::task::spawn_blocking(move || writer.send(job))
                    .await
                    .map_err(DbError::from)?
                    .map_err(|_| DbError::Migration("the database writer has stopped".into()))?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(DbError::Migration("the database writer has stopped".into()).into());
            }
        }
        answer
            .await
            .map_err(|_| DbError::Migration("the database writer dropped a write".into()))?
    }

    /// `write` for callers already off the async threads (bulk files, CLI commands).
    pub fn write_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E>,
        E: From<DbError> + From<diesel::result::Error>,
    {
        if !self.is_sqlite() {
            let mut conn = checkout(&self.pool)?;
            return write_transaction(&mut conn, f);
        }
        // The writer's page cache makes way for the long write's, twice its size ([`ReleaseCache`]).
        let (released, wait) = std::sync::mpsc::sync_channel(1);
        if self.writer.send(Box::new(ReleaseCache(released))).is_ok() {
            // Answered once the writer has freed its pages, or has failed to begin a batch.
            let _ = wait.recv();
        }
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A long write (a bulk file, a CLI command) dirties more pages than a reader's cache holds; SQLite would
        // spill them to the WAL in the middle of the transaction and read them back. It runs on a connection of
        // its own with a large cache ([`LONG_WRITE_CACHE`]), closed when it ends: a pooled connection given the
        // large cache and then a small one again kept the memory (the server's resident set after a
        // 100,000-row import was 35 MB higher at full size, and 70 to 140 MB on a small database, than with a
        // connection that is closed).
        let mut conn = self
            .manager
            .connect()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        // Its commit does not checkpoint: copying a bulk file's pages into the database (5% of an import) is
        // left to the checkpointer, after the answer. The next long write first copies what is left, so long
        // writes one after another (seeding the benchmark) do not let the WAL grow between them, which made the
        // flag checks after them run at two thirds of their rate.
        if let DbConnection::Sqlite(c) = &mut conn {
            for setting in [LONG_WRITE_CACHE, LONG_WRITE_CHECKPOINT] {
                c.batch_execute(setting)?;
            }
        }
        let result = write_transaction(&mut conn, f);
        drop(conn);
        // The connection's page cache is freed on this thread, which may not allocate again for a while;
        // mimalloc would keep the pages until it does. Giving them back now brought the server's resident set
        // after a 100,000-row import from 269 to 295 MB down to 130 to 133 MB (300,000 persons).
        return_free_pages();
        result
    }

    /// Copies what SQLite's WAL holds into the database file as far as readers allow (a passive checkpoint);
    /// true when nothing is left to copy, and always on PostgreSQL. The benchmark waits on it before it times
    /// SQLite's own insert, since a long write leaves its copying until after its answer.
    pub fn copy_wal(&self) -> Result<bool, DbError> {
        match &mut *self.get()? {
            DbConnection::Sqlite(c) => {
                let done = checkpoint(c, "PASSIVE")?;
                Ok(done.checkpointed >= done.log)
            }
            DbConnection::Postgres(_) => Ok(true),
        }
    }

    pub fn get(&self) -> Result<r2d2::PooledConnection<Manager>, DbError> {
        checkout(&self.pool)
    }

    /// Applies any migration not yet run; returns how many ran.
    pub fn migrate(&self) -> Result<usize, DbError> {
        let mut conn = self.get()?;
        let applied = match &mut *conn {
            DbConnection::Postgres(c) => c
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|v| v.len()),
            DbConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
        };
        applied.map_err(|e| DbError::Migration(e.to_string()))
    }

    /// True when the database answers and every embedded migration has run.
    pub fn is_ready(&self) -> Result<bool, DbError> {
        let mut conn = self.get()?;
        let pending = match &mut *conn {
            DbConnection::Postgres(c) => c.has_pending_migration(POSTGRES_MIGRATIONS),
            DbConnection::Sqlite(c) => c.has_pending_migration(SQLITE_MIGRATIONS),
        };
        pending
            .map(|p| !p)
            .map_err(|e| DbError::Migration(e.to_string()))
    }

    /// Whether this is PostgreSQL with autovacuum off. cpis's statements are planned from the tables'
    /// statistics, which autovacuum keeps in step as tables grow; without it they go stale, and a table analysed
    /// while nearly empty stays so to the planner, which then scans all of it (BENCHMARKS.md, twenty-third
    /// session: the visit lookup became a scan of every notification).
    pub fn autovacuum_off(&self) -> Result<bool, DbError> {
        #[derive(diesel::QueryableByName)]
        struct Setting {
            #[diesel(sql_type = diesel::sql_types::Text)]
            autovacuum: String,
        }
        let mut conn = self.get()?;
        let DbConnection::Postgres(c) = &mut *conn else {
            return Ok(false);
        };
        use diesel::RunQueryDsl;
        let setting: Setting =
            diesel::sql_query("SELECT current_setting('autovacuum') AS autovacuum")
                .get_result(c)?;
        Ok(setting.autovacuum == "off")
    }
}

/// A new row id: a UUID version 7, whose leading bits are the time, so that rows written together land at the
/// end of their table's primary-key index instead of at random places in it (a random v4 key dirties a
/// different index page per row, which the writer's profile showed as most of its page writes).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// SQLite's memory from the process's Rust allocator (mimalloc in the server) instead of the C library's malloc.
/// A read connection's page cache is emptied whenever the writer has committed since its last read (many times a
/// second under load), and glibc returned those freed pages to the kernel at once, with a TLB shootdown on
/// every core each time, only to fault them back in on the next read.
mod sqlite_alloc {
    use std::alloc::{alloc, dealloc, realloc, Layout};
    use std::ffi::{c_int, c_void};

    /// Each allocation carries its size in front of it (SQLite asks for sizes back, and Rust's `dealloc` needs
    /// them); 8 bytes keeps the memory SQLite sees 8-byte aligned, as it requires.
    const HEADER: usize = 8;

    fn layout(size: usize) -> Option<Layout> {
        Layout::from_size_align(size.checked_add(HEADER)?, HEADER).ok()
    }

    unsafe extern "C" fn x_malloc(size: c_int) -> *mut c_void {
        let size = size.max(0) as usize;
        let Some(layout) = layout(size) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the layout has a non-zero size; the header is written inside the allocation.
        unsafe {
            let base = alloc(layout);
            if base.is_null() {
                return std::ptr::null_mut();
            }
            (base as *mut usize).write(size);
            base.add(HEADER) as *mut c_void
        }
    }

    /// SAFETY (for the callers, SQLite): `p` came from `x_malloc` or `x_realloc` and is not used afterwards.
    unsafe extern "C" fn x_free(p: *mut c_void) {
        if p.is_null() {
            return;
        }
        // SAFETY: the header in front of `p` holds the size it was allocated with.
        unsafe {
            let base = (p as *mut u8).sub(HEADER);
            let size = (base as *const usize).read();
            dealloc(base, layout(size).expect("allocated with this layout"));
        }
    }

    unsafe extern "C" fn x_realloc(p: *mut c_void, size: c_int) -> *mut c_void {
        if p.is_null() {
            // SAFETY: as for `x_malloc`.
            return unsafe { x_malloc(size) };
        }
        let size = size.max(0) as usize;
        if layout(size).is_none() {
            return std::ptr::null_mut();
        }
        // SAFETY: `p` came from this allocator, so its header holds its size; the new size fits a layout.
        unsafe {
            let base = (p as *mut u8).sub(HEADER);
            let old = (base as *const usize).read();
            let moved = realloc(base, layout(old).expect("allocated"), size + HEADER);
            if moved.is_null() {
                return std::ptr::null_mut();
            }
            (moved as *mut usize).write(size);
            moved.add(HEADER) as *mut c_void
        }
    }

    unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
        if p.is_null() {
            return 0;
        }
        // SAFETY: `p` came from this allocator.
        unsafe { ((p as *mut u8).sub(HEADER) as *const usize).read() as c_int }
    }

    unsafe extern "C" fn x_roundup(size: c_int) -> c_int {
        (size.max(0).saturating_add(7)) & !7
    }

    unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
        libsqlite3_sys::SQLITE_OK
    }

    unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

    /// The methods for SQLITE_CONFIG_MALLOC (SQLite copies them before `sqlite3_config` returns).
    pub fn methods() -> libsqlite3_sys::sqlite3_mem_methods {
        libsqlite3_sys::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        }
    }
}

/// Process-wide SQLite set-up, once, before the first connection (SQLite refuses configuration after it has
/// initialised, so later calls change nothing).
///
/// - Multi-thread mode instead of serialized: SQLite no longer locks a connection's mutex on every call (each
///   bind, step and reset), which was 14% of a bulk import's thread. cpis never uses one connection from two
///   threads at once: diesel's connections are `Send` but not `Sync`, and the pool, the writer, the
///   checkpointer and the per-thread readers each hold theirs alone.
/// - Memory statistics off: they take a process-wide mutex on every allocation, which the profile of a loaded
///   server showed as its largest cost; cpis does not read them.
/// - Query planner stability on every connection (`SQLITE_DBCONFIG_ENABLE_QPSG`): without it SQLite marks a
///   statement whose `LIMIT` is a bound parameter (diesel's `.first()`) as depending on that value, and
///   re-parses and re-plans the cached statement on every execution; the profile showed this as a tenth of the
///   server's time. cpis keeps no planner statistics, so the plans do not change.
/// - Memory from the Rust allocator ([`sqlite_alloc`]).
/// - A page cache of its own for each connection: SQLite is built without `SQLITE_ENABLE_MEMORY_MANAGEMENT`
///   (`.cargo/config.toml`), which would put every connection's pages in one pool behind one process-wide mutex.
/// - SQLite's page cache behind [`pcache`], which skips truncations that have nothing to drop.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before any other SQLite call in the process (the first `connect`);
        // SQLITE_CONFIG_MULTITHREAD takes no argument.
        let rc =
            unsafe { libsqlite3_sys::sqlite3_config(libsqlite3_sys::SQLITE_CONFIG_MULTITHREAD) };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(rc, "SQLite was already initialised; it stays serialized");
        }
        // SAFETY: as above, with the documented arguments for SQLITE_CONFIG_MEMSTATUS (one int).
        let rc = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was already initialised; memory statistics stay on"
            );
        }
        // SAFETY: as above; SQLITE_CONFIG_MALLOC takes a pointer to the methods, which SQLite copies.
        let methods = sqlite_alloc::methods();
        let rc = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MALLOC,
                &methods as *const libsqlite3_sys::sqlite3_mem_methods,
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was already initialised; it keeps the C allocator"
            );
        }
        pcache::install();
        // SAFETY: `stable_plans` has the signature SQLite calls an auto-extension with, and stays valid for the
        // life of the process.
        let rc = unsafe { libsqlite3_sys::sqlite3_auto_extension(Some(stable_plans)) };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::warn!(rc, "SQLite query planner stability could not be set");
        }
        // Last: registering a VFS starts SQLite, after which the settings above could not be made.
        walbuf::install();
    });
}

/// Run by SQLite on every new connection: turns on query planner stability (see [`configure_sqlite`]).
unsafe extern "C" fn stable_plans(
    db: *mut libsqlite3_sys::sqlite3,
    _error: *mut *mut std::ffi::c_char,
    _api: *const libsqlite3_sys::sqlite3_api_routines,
) -> std::ffi::c_int {
    // SAFETY: `db` is the connection SQLite is opening; ENABLE_QPSG takes an int and a nullable int pointer.
    unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            std::ptr::null_mut::<std::ffi::c_int>(),
        );
    }
    libsqlite3_sys::SQLITE_OK
}

/// Call before a process's first PostgreSQL connection (every connection cpis opens does).
///
/// libpq encrypts with OpenSSL, which by default frees its state from an `atexit` handler when the process exits,
/// while other threads (the pool's, the writer, jobs winding down) may still be connecting or closing
/// connections; they then crash on freed memory, a segmentation fault after everything else succeeded. This
/// initialises OpenSSL first without that handler (the operating system frees everything at exit anyway); once
/// OpenSSL has initialised otherwise, it is too late, so callers that connect outside [`Db`] call it too.
pub fn prepare_libpq() {
    openssl_sys::init();
}

/// The URL cpis gives libpq: GSSAPI (Kerberos) encryption off unless the URL sets `gssencmode` itself.
///
/// libpq's default (`prefer`) looks for Kerberos credentials before every connection, through the Kerberos
/// library, whose exit-time finaliser destroys locks that a thread still connecting then aborts on (seen in the
/// `process_exit` test); it also slows every connection where there is no Kerberos. Encryption for PostgreSQL
/// connections is TLS (`sslmode`), which this leaves as the URL has it.
fn libpq_url(url: &str) -> std::borrow::Cow<'_, str> {
    let query = url.split_once('?').map(|(_, q)| q);
    let asks = query.is_some_and(|q| q.split('&').any(|p| p.starts_with("gssencmode=")));
    match (asks, query) {
        (true, _) => url.into(),
        (false, Some(_)) => format!("{url}&gssencmode=disable").into(),
        (false, None) => format!("{url}?gssencmode=disable").into(),
    }
}

fn create_parent_dir(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => std::fs::create_dir_all(parent),
        _ => Ok(()),
    }
}

/// Where a SQLite URL points, for tools that need the file itself (backups).
pub fn sqlite_path(settings: &DatabaseSettings) -> Option<PathBuf> {
    match settings.kind() {
        Ok(DatabaseKind::Sqlite { path }) => Some(path),
        _ => None,
    }
}

/// Moves the chain's head to its new last event: once per write batch. Diesel prepares every `UPDATE` afresh (its
/// `UpdateStatement` is never kept in the statement cache, since a changeset's SQL may vary); this one never
/// varies, so it is a statement of its own that diesel finds by type and keeps prepared. Preparing the `UPDATE`
/// was 5.8% of the writer thread under flag checks that miss (BENCHMARKS.md, change 50).
pub fn advance_audit_head(
    conn: &mut DbConnection,
    seq: i64,
    hash: &str,
) -> Result<(), diesel::result::Error> {
    use diesel::RunQueryDsl;
    crate::on_backend!(conn, |c| AdvanceHead { seq, hash }.execute(c)).map(|_| ())
}

/// `UPDATE audit_head SET last_seq = ?, last_hash = ? WHERE id = 1`, for [`advance_audit_head`].
struct AdvanceHead<'a> {
    seq: i64,
    hash: &'a str,
}

/// Found by type: one prepared statement per connection.
impl diesel::query_builder::QueryId for AdvanceHead<'_> {
    type QueryId = AdvanceHead<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<DB> diesel::query_builder::QueryFragment<DB> for AdvanceHead<'_>
where
    DB: diesel::backend::Backend,
    i64: diesel::serialize::ToSql<diesel::sql_types::BigInt, DB>,
    str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> diesel::QueryResult<()> {
        out.push_sql("UPDATE audit_head SET last_seq = ");
        out.push_bind_param::<diesel::sql_types::BigInt, _>(&self.seq)?;
        out.push_sql(", last_hash = ");
        out.push_bind_param::<diesel::sql_types::Text, _>(self.hash)?;
        out.push_sql(" WHERE id = 1");
        Ok(())
    }
}

impl<Conn> diesel::RunQueryDsl<Conn> for AdvanceHead<'_> {}

/// Takes the chain's head row for update. On PostgreSQL this row lock is what orders concurrent appenders;
/// SQLite has a single writer already, and has no `FOR UPDATE`.
pub fn lock_audit_head(conn: &mut DbConnection) -> Result<(i64, String), diesel::result::Error> {
    use diesel::prelude::*;
    use schema::audit_head::dsl::*;
    match conn {
        DbConnection::Postgres(c) => audit_head
            .filter(id.eq(1))
            .select((last_seq, last_hash))
            .for_update()
            .first(c),
        DbConnection::Sqlite(c) => audit_head
            .filter(id.eq(1))
            .select((last_seq, last_hash))
            .first(c),
    }
}

#[derive(diesel::QueryableByName)]
pub struct Claimed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub notification_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub channel: String,
}

/// Claims up to `limit` due deliveries for this instance until `lease_until`. On PostgreSQL, `FOR UPDATE SKIP
/// LOCKED` lets several instances claim at once without taking the same row; an expired lease (its instance
/// died) makes a row claimable again. SQLite has one writer, so the plain form is enough.
pub fn claim_deliveries(
    conn: &mut DbConnection,
    now: chrono::NaiveDateTime,
    lease_until: chrono::NaiveDateTime,
    instance: &str,
    limit: i64,
) -> Result<Vec<Claimed>, diesel::result::Error> {
    use diesel::sql_types::{BigInt, Text, Timestamp};
    use diesel::RunQueryDsl;
    match conn {
        DbConnection::Postgres(c) => diesel::sql_query(
            "UPDATE deliveries SET lease_until = $1, leased_by = $2 \
             WHERE (notification_id, channel) IN ( \
               SELECT notification_id, channel FROM deliveries \
               WHERE status = 'pending' AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until < $3) \
               ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING notification_id, channel",
        )
        .bind::<Timestamp, _>(lease_until)
        .bind::<Text, _>(instance)
        .bind::<Timestamp, _>(now)
        .bind::<BigInt, _>(limit)
        .load(c),
        DbConnection::Sqlite(c) => diesel::sql_query(
            "UPDATE deliveries SET lease_until = ?1, leased_by = ?2 \
             WHERE (notification_id, channel) IN ( \
               SELECT notification_id, channel FROM deliveries \
               WHERE status = 'pending' AND next_attempt_at <= ?3 AND (lease_until IS NULL OR lease_until < ?3) \
               ORDER BY next_attempt_at LIMIT ?4) \
             RETURNING notification_id, channel",
        )
        .bind::<Timestamp, _>(lease_until)
        .bind::<Text, _>(instance)
        .bind::<Timestamp, _>(now)
        .bind::<BigInt, _>(limit)
        .load(c),
    }
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// Takes a session-level advisory lock on PostgreSQL so one instance runs a job tick; SQLite has one process.
pub fn try_job_lock(conn: &mut DbConnection, key: i64) -> Result<bool, diesel::result::Error> {
    use diesel::RunQueryDsl;
    match conn {
        DbConnection::Postgres(c) => diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind::<diesel::sql_types::BigInt, _>(key)
            .get_result::<Locked>(c)
            .map(|l| l.locked),
        DbConnection::Sqlite(_) => Ok(true),
    }
}

pub fn release_job_lock(conn: &mut DbConnection, key: i64) -> Result<(), diesel::result::Error> {
    use diesel::RunQueryDsl;
    match conn {
        DbConnection::Postgres(c) => diesel::sql_query("SELECT pg_advisory_unlock($1) AS locked")
            .bind::<diesel::sql_types::BigInt, _>(key)
            .get_result::<Locked>(c)
            .map(|_| ()),
        DbConnection::Sqlite(_) => Ok(()),
    }
}

/// The statuses of these notifications, locked on PostgreSQL until the transaction ends, so that
/// two instances recording channels of one notification cannot each miss the other's outcome when its status is
/// recomputed (locked in id order, so two instances cannot deadlock). SQLite writes are serialised already.
pub fn lock_notifications(
    conn: &mut DbConnection,
    ids: &[&str],
) -> Result<Vec<(String, String)>, diesel::result::Error> {
    use diesel::prelude::*;
    use schema::notifications::dsl::*;
    match conn {
        DbConnection::Postgres(c) => notifications
            .filter(id.eq_any(ids))
            .order(id)
            .select((id, status))
            .for_update()
            .load(c),
        DbConnection::Sqlite(c) => notifications
            .filter(id.eq_any(ids))
            .select((id, status))
            .load(c),
    }
}

/// Which channels of these notifications are still pending and leased to `instance`, locked on PostgreSQL (in key
/// order) until the transaction ends (SQLite writes are serialised already).
pub fn lock_leased_deliveries(
    conn: &mut DbConnection,
    ids: &[&str],
    instance: &str,
) -> Result<Vec<(String, String)>, diesel::result::Error> {
    use diesel::prelude::*;
    use schema::deliveries::dsl::*;
    let leased = deliveries
        .filter(notification_id.eq_any(ids))
        .filter(leased_by.eq(instance))
        .filter(status.eq(crate::notify::PENDING))
        .select((notification_id, channel));
    match conn {
        DbConnection::Postgres(c) => leased
            .order((notification_id, channel))
            .for_update()
            .load(c),
        DbConnection::Sqlite(c) => leased.load(c),
    }
}

/// Runs a diesel query on the concrete connection inside a [`DbConnection`]: the body is compiled once per
/// backend. Through the connection enum, diesel looks up a query's prepared statement by building its SQL text
/// on every execution; on the concrete connection it finds it by the query's type. The profile of the writer
/// showed that SQL building as a fifth of its time, so the queries of the hot paths (flag checks,
/// attendances, notifications, audit) run through this.
#[macro_export]
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConnection::Postgres($c) => $body,
            $crate::db::DbConnection::Sqlite($c) => $body,
        }
    };
}

/// SQLite's multi-row inserts are `INSERT OR FAIL`. With the default `ABORT`, a statement that may fail part way
/// (a `NOT NULL` or `UNIQUE` constraint on its table) keeps a statement journal, copying each page it touches
/// before changing it, so that it can undo its own earlier rows alone: 9.5% of a bulk file's import and about
/// 7% of the writer. With `FAIL` the statement stops at the failing row and keeps the rows before it, and
/// SQLite keeps no journal for it (a table with a foreign key, plans and deliveries, still has one). No caller
/// goes on after a failed insert: each runs inside a savepoint or transaction that the failure rolls back
/// whole (a write's savepoint, the writer's batch for its deferred rows, a bulk file's transaction), which a
/// unit test checks. Diesel writes `INSERT`, `INSERT OR IGNORE` and `REPLACE` only; its statement is built with
/// this operator through the constructor diesel opens to third-party backends (the
/// `i-implement-a-third-party-backend-and-opt-into-breaking-changes` feature, outside diesel's semver
/// promise; `Cargo.lock` pins the version).
#[derive(Debug, Clone, Copy, diesel::query_builder::QueryId)]
struct InsertOrFail;

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for InsertOrFail {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> diesel::QueryResult<()> {
        out.push_sql("INSERT OR FAIL");
        Ok(())
    }
}

/// While at least `n` rows are left in `$rest`, runs `$body` with the next `n` as the array `$chunk`, for each
/// chunk size `n` of the backend's in turn (see [`batch_insert!`]): on PostgreSQL the powers of two from 64 down,
/// on SQLite 64, 16, 4 and 1.
macro_rules! in_chunks {
    (postgres, $rest:ident: $row:ty, |$chunk:ident| $body:expr) => {
        in_chunks!([64, 32, 16, 8, 4, 2, 1], $rest: $row, |$chunk| $body)
    };
    (sqlite, $rest:ident: $row:ty, |$chunk:ident| $body:expr) => {
        in_chunks!([64, 16, 4, 1], $rest: $row, |$chunk| $body)
    };
    ([$($n:literal),*], $rest:ident: $row:ty, |$chunk:ident| $body:expr) => {{$(
        while $rest.len() >= $n {
            let (head, tail) = $rest.split_at($n);
            let $chunk: &[$row; $n] = head.try_into().expect("split at the chunk size");
            $body;
            $rest = tail;
        }
    )*}};
}

/// Multi-row inserts, which diesel's connection enum cannot express for both backends at once: the same
/// statement, typed once per backend.
///
/// On SQLite, rows go in fixed-size chunks (64, 16, 4, then 1 at a time): a fixed-size array of rows is one
/// multi-row statement whose prepared form diesel finds by type, so each table has four statements, prepared
/// once per connection (a slice of any length would be a new SQL text, built and looked up on every call). On
/// PostgreSQL, where each statement is a round trip to the server, the chunks are the powers of two from 64
/// down to 1, so a batch of `n` rows up to 127 takes as many statements as `n` has bits set (a batch of 9 takes
/// two) and a bulk file's chunk of 1,000 seventeen, each prepared once per connection by the server. A slice
/// would be an unnamed statement that PostgreSQL parses, analyses and plans on every call: about half its time
/// on a bulk file's inserts, and a fifth of the writer's session under flag checks (BENCHMARKS.md, change 62).
/// Chunks of up to 512 were no faster, and a prepared insert of 512 rows of 21 columns holds about 2.8 MB in
/// its server session against 0.4 MB for one of 64. Callers pass all their rows at once. The row types are
/// `treat_none_as_default_value = false`: with `DEFAULT` for absent values, diesel cannot write a multi-row
/// insert for SQLite and runs one insert per row inside a savepoint instead.
macro_rules! batch_insert {
    ($(#[$doc:meta])* $name:ident, $table:path, $row:ty) => {
        $(#[$doc])*
        pub fn $name(conn: &mut DbConnection, rows: &[$row]) -> Result<usize, diesel::result::Error> {
            use diesel::prelude::*;
            let mut inserted = 0;
            let mut rest = rows;
            match conn {
                DbConnection::Postgres(c) => in_chunks!(postgres, rest: $row, |chunk| {
                    inserted += diesel::insert_into($table).values(chunk).execute(c)?
                }),
                // `INSERT OR FAIL` (see [`InsertOrFail`]): diesel's own statement with its operator changed.
                DbConnection::Sqlite(c) => in_chunks!(sqlite, rest: $row, |chunk| {
                    let plain = diesel::insert_into($table).values(chunk);
                    inserted += diesel::query_builder::InsertStatement::new(
                        plain.target,
                        plain.records,
                        InsertOrFail,
                        plain.returning,
                    )
                    .execute(c)?
                }),
            }
            Ok(inserted)
        }
    };
}

batch_insert!(
    insert_persons,
    schema::persons::table,
    crate::mpi::builtin::PersonRow
);
batch_insert!(insert_plans, schema::plans::table, models::PlanRow);
batch_insert!(
    insert_attendances,
    schema::attendances::table,
    crate::attendances::AttendanceRow
);
batch_insert!(insert_accesses, schema::accesses::table, models::AccessRow);
batch_insert!(
    insert_notifications,
    schema::notifications::table,
    crate::notify::NotificationRow
);
batch_insert!(
    insert_deliveries,
    schema::deliveries::table,
    crate::notify::DeliveryRow
);
batch_insert!(
    insert_delivery_attempts,
    schema::delivery_attempts::table,
    crate::notify::AttemptRow
);
batch_insert!(
    insert_audit_rows,
    schema::audit_events::table,
    crate::audit::AuditRow
);

/// Inserts attendances, skipping any already stored with the same setting and id, and answers the ids of those
/// it stored. On PostgreSQL, `ON CONFLICT DO NOTHING ... RETURNING id`, in the chunks of [`batch_insert!`]: an
/// attendance that another instance's transaction holds is waited for, and skipped if that transaction commits;
/// of two copies in the same statement, the first is stored. SQLite has no copies to skip (its one writer looks
/// for them before it buffers an attendance): every row is inserted.
pub fn insert_new_attendances(
    conn: &mut DbConnection,
    rows: &[crate::attendances::AttendanceRow],
) -> Result<std::collections::HashSet<String>, diesel::result::Error> {
    use crate::attendances::AttendanceRow;
    use diesel::prelude::*;
    use schema::attendances;
    let c = match conn {
        DbConnection::Postgres(c) => c,
        DbConnection::Sqlite(_) => {
            insert_attendances(conn, rows)?;
            return Ok(rows.iter().map(|r| r.id.clone()).collect());
        }
    };
    let mut stored = std::collections::HashSet::with_capacity(rows.len());
    let mut rest = rows;
    in_chunks!(postgres, rest: AttendanceRow, |chunk| {
        stored.extend(
            diesel::insert_into(attendances::table)
                .values(chunk)
                .on_conflict_do_nothing()
                .returning(attendances::id)
                .get_results::<String>(c)?,
        )
    });
    Ok(stored)
}

/// Asserts that `PRAGMA integrity_check` finds the database behind `conn` sound (test builds).
#[cfg(test)]
pub(crate) fn assert_sound(conn: &mut diesel::SqliteConnection) {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }
    let found: Vec<Check> = diesel::sql_query("PRAGMA integrity_check")
        .load(conn)
        .unwrap();
    let found: Vec<String> = found.into_iter().map(|c| c.integrity_check).collect();
    assert_eq!(found, ["ok"], "the database is sound");
}

#[cfg(test)]
pub(crate) mod tests {
    use diesel::prelude::*;
    use libsqlite3_sys as ffi;

    #[derive(QueryableByName)]
    struct CacheSize {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        cache_size: i64,
    }

    #[derive(QueryableByName)]
    struct WalAutocheckpoint {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        wal_autocheckpoint: i64,
    }

    /// A migrated SQLite database in a temporary folder, with the folder (the database goes with it).
    fn migrated_sqlite() -> (tempfile::TempDir, super::Db) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cpis.db").display());
        let db = super::Db::connect(&crate::config::Settings::for_database(&url).database).unwrap();
        db.migrate().unwrap();
        (dir, db)
    }

    /// A SQLite connection's page cache setting (negative: KiB).
    fn cache_size(conn: &mut super::DbConnection) -> i64 {
        let row: CacheSize = crate::on_backend!(conn, |c| diesel::sql_query("PRAGMA cache_size")
            .get_result(c))
        .unwrap();
        row.cache_size
    }

    #[derive(QueryableByName)]
    struct Synchronous {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        synchronous: i64,
    }

    /// A SQLite connection's `synchronous` setting: 1 is NORMAL, 2 is FULL.
    fn synchronous(conn: &mut super::DbConnection) -> i64 {
        let row: Synchronous =
            crate::on_backend!(conn, |c| diesel::sql_query("PRAGMA synchronous")
                .get_result(c))
            .unwrap();
        row.synchronous
    }

    /// How many WAL frames a SQLite connection lets the WAL reach before it checkpoints in its commit.
    fn wal_autocheckpoint(conn: &mut super::DbConnection) -> i64 {
        let row: WalAutocheckpoint =
            crate::on_backend!(conn, |c| diesel::sql_query("PRAGMA wal_autocheckpoint")
                .get_result(c))
            .unwrap();
        row.wal_autocheckpoint
    }

    #[test]
    fn libpq_gets_gssapi_encryption_off_unless_the_url_sets_it() {
        use super::libpq_url;
        assert_eq!(
            libpq_url("postgres://cpis@db/cpis"),
            "postgres://cpis@db/cpis?gssencmode=disable"
        );
        assert_eq!(
            libpq_url("postgres://cpis@db/cpis?sslmode=require"),
            "postgres://cpis@db/cpis?sslmode=require&gssencmode=disable"
        );
        assert_eq!(
            libpq_url("postgresql://db/cpis?gssencmode=require&sslmode=disable"),
            "postgresql://db/cpis?gssencmode=require&sslmode=disable"
        );
        assert_eq!(
            libpq_url("postgres://db/cpis?sslmode=prefer&gssencmode=prefer"),
            "postgres://db/cpis?sslmode=prefer&gssencmode=prefer"
        );
    }

    /// Before a long write takes the write lock, the group-commit writer frees its page cache in a batch of its
    /// own; the long write then runs, and the writer carries on with its connection afterwards.
    #[tokio::test]
    async fn a_long_write_first_has_the_writer_free_its_page_cache() {
        use super::schema::job_runs;
        use diesel::prelude::*;
        let (_dir, db) = migrated_sqlite();
        let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let insert = move |name: &'static str| {
            move |conn: &mut super::DbConnection| {
                crate::on_backend!(conn, |c| diesel::insert_into(job_runs::table)
                    .values((job_runs::name.eq(name), job_runs::last_tick.eq(at)))
                    .execute(c))
                .map_err(super::DbError::from)
            }
        };
        db.write(insert("before")).await.unwrap();
        let batches = db.stats.batches.get();
        let inside = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || {
                db.write_blocking(|conn| {
                    insert("long")(conn)?;
                    Ok::<_, super::DbError>(db.stats.batches.get())
                })
            })
            .await
            .unwrap()
            .unwrap()
        };
        assert_eq!(
            inside,
            batches + 1,
            "the writer ran one batch (the release) before the long write began"
        );
        db.write(insert("after")).await.unwrap();
        let names: Vec<String> = db
            .read(|conn| {
                crate::on_backend!(conn, |c| job_runs::table
                    .select(job_runs::name)
                    .order(job_runs::name)
                    .load(c))
                .map_err(super::DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(names, ["after", "before", "long"]);
    }

    /// A raw SQLite connection for tests of SQLite's own behaviour, closed when dropped.
    struct RawSqlite(*mut ffi::sqlite3);

    impl RawSqlite {
        fn open(path: &std::path::Path) -> Self {
            super::configure_sqlite();
            let path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            let mut db = std::ptr::null_mut();
            // SAFETY: a valid path and out-pointer; the handle is closed in `drop`.
            assert_eq!(
                unsafe { ffi::sqlite3_open(path.as_ptr(), &mut db) },
                ffi::SQLITE_OK
            );
            RawSqlite(db)
        }

        fn exec(&self, sql: &std::ffi::CStr) {
            // SAFETY: an open handle and a NUL-terminated statement list, with no callback.
            let rc = unsafe {
                ffi::sqlite3_exec(
                    self.0,
                    sql.as_ptr(),
                    None,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(rc, ffi::SQLITE_OK, "{sql:?}");
        }

        /// Bytes of pages the connection's cache holds.
        fn cache_used(&self) -> i32 {
            let (mut now, mut high) = (0, 0);
            // SAFETY: an open handle and two out-pointers.
            let rc = unsafe {
                ffi::sqlite3_db_status(
                    self.0,
                    ffi::SQLITE_DBSTATUS_CACHE_USED,
                    &mut now,
                    &mut high,
                    0,
                )
            };
            assert_eq!(rc, ffi::SQLITE_OK);
            now
        }
    }

    impl Drop for RawSqlite {
        fn drop(&mut self) {
            // SAFETY: the handle opened in `open`, closed once; `sqlite3_exec` finalises the statements it runs,
            // and a test that prepares its own finalises it first.
            unsafe { ffi::sqlite3_close(self.0) };
        }
    }

    /// Makes a WAL database with a table of about 4 MB through `conn`.
    fn write_table(conn: &RawSqlite) {
        conn.exec(c"PRAGMA journal_mode = WAL;");
        conn.exec(
            c"CREATE TABLE t (a TEXT); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
              WHERE i < 20000) INSERT INTO t SELECT printf('%0200d', i) FROM n;",
        );
    }

    /// Reads the table through `conn` with a cache large enough for it; answers the bytes its cache then holds.
    fn filled_cache(conn: &RawSqlite) -> i32 {
        conn.exec(c"PRAGMA cache_size = -65536; SELECT count(*) FROM t WHERE a <> '';");
        let full = conn.cache_used();
        assert!(full > 4 << 20, "the cache holds the table: {full} bytes");
        full
    }

    /// What the release relies on: inside a write transaction, before anything is written, `shrink_memory`
    /// frees every page a connection's cache holds.
    #[test]
    fn shrink_memory_frees_a_connections_pages_inside_a_write_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let conn = RawSqlite::open(&dir.path().join("t.db"));
        write_table(&conn);
        let full = filled_cache(&conn);
        conn.exec(c"BEGIN IMMEDIATE; PRAGMA shrink_memory;");
        let released = conn.cache_used();
        conn.exec(c"COMMIT;");
        assert!(
            released < full / 10,
            "{released} bytes left of {full} after shrink_memory"
        );
    }

    /// Each connection has a page cache of its own (SQLite built without `SQLITE_ENABLE_MEMORY_MANAGEMENT`, see
    /// `.cargo/config.toml`): in SQLite's unified mode every cache shares one pool behind one process-wide mutex,
    /// and one connection freeing its cache also empties every other's.
    #[test]
    fn each_connection_keeps_its_own_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = (
            RawSqlite::open(&dir.path().join("t.db")),
            RawSqlite::open(&dir.path().join("t.db")),
        );
        write_table(&writer);
        filled_cache(&writer);
        let full = filled_cache(&reader);
        writer.exec(c"PRAGMA shrink_memory;");
        assert!(
            writer.cache_used() < full / 10,
            "the writer freed its pages"
        );
        assert_eq!(
            reader.cache_used(),
            full,
            "the reader's cache is untouched by the writer's release"
        );
    }

    /// Runs `sql` with `?1` bound to each of `limits` in turn, and answers how often SQLite re-prepared it.
    fn reprepares(limits: &[i64]) -> i32 {
        let conn = RawSqlite::open(std::path::Path::new(":memory:"));
        conn.exec(c"CREATE TABLE t (a TEXT); INSERT INTO t VALUES ('x'), ('y'), ('z');");
        let mut stmt = std::ptr::null_mut();
        let sql = c"SELECT a FROM t WHERE a <> 'w' LIMIT ?1";
        // SAFETY: plain use of the SQLite C API on the open connection; the statement is finalised before it
        // closes.
        unsafe {
            let rc = ffi::sqlite3_prepare_v3(
                conn.0,
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                std::ptr::null_mut(),
            );
            assert_eq!(rc, ffi::SQLITE_OK);
            for limit in limits {
                ffi::sqlite3_bind_int64(stmt, 1, *limit);
                let mut rows = 0;
                while ffi::sqlite3_step(stmt) == ffi::SQLITE_ROW {
                    rows += 1;
                }
                assert_eq!(rows, (*limit).min(3));
                ffi::sqlite3_reset(stmt);
            }
            let n = ffi::sqlite3_stmt_status(stmt, ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
            ffi::sqlite3_finalize(stmt);
            n
        }
    }

    #[test]
    fn the_audit_head_moves_through_one_statement_prepared_once() {
        use diesel::connection::{Connection, InstrumentationEvent};
        use diesel::prelude::*;
        use std::sync::{Arc, Mutex};
        let mut conn = memory_sqlite();
        let cached = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = cached.clone();
        let super::DbConnection::Sqlite(c) = &mut conn else {
            unreachable!("an SQLite connection")
        };
        c.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { sql, .. } = event {
                seen.lock().unwrap().push(sql.to_string());
            }
        });
        for (seq, hash) in [(1, "a1"), (2, "b2"), (3, "c3")] {
            super::advance_audit_head(&mut conn, seq, hash).unwrap();
        }
        let head: (i64, String) = super::schema::audit_head::table
            .select((
                super::schema::audit_head::last_seq,
                super::schema::audit_head::last_hash,
            ))
            .first(&mut conn)
            .unwrap();
        assert_eq!(head, (3, "c3".to_string()));
        let updates: Vec<String> = cached
            .lock()
            .unwrap()
            .iter()
            .filter(|sql| sql.starts_with("UPDATE audit_head"))
            .cloned()
            .collect();
        assert_eq!(updates.len(), 1, "prepared once and kept: {updates:?}");
    }

    #[test]
    fn a_cached_statement_with_a_bound_limit_is_not_reprepared_on_each_run() {
        assert_eq!(reprepares(&[1, 2, 1, 3, 2]), 0);
    }

    /// The failure seen under load: another connection held SQLite's write lock for an instant just as the
    /// writer's batch, having read, went to write, and the whole batch failed with "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_that_reads_then_writes_waits_for_a_write_lock_held_elsewhere() {
        use super::schema::{job_runs, organisations};
        use diesel::prelude::*;
        let (dir, db) = migrated_sqlite();
        let (locked, go) = std::sync::mpsc::channel();
        let path = dir.path().join("cpis.db");
        let holder = std::thread::spawn(move || {
            use diesel::connection::SimpleConnection;
            let mut other = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
            other.batch_execute("BEGIN IMMEDIATE").unwrap();
            locked.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            other.batch_execute("COMMIT").unwrap();
        });
        go.recv().unwrap();
        let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let written = db
            .write(move |conn| {
                let organisations: i64 =
                    crate::on_backend!(&mut *conn, |c| organisations::table.count().get_result(c))?;
                crate::on_backend!(&mut *conn, |c| diesel::insert_into(job_runs::table)
                    .values((job_runs::name.eq("probe"), job_runs::last_tick.eq(at)))
                    .execute(c))?;
                Ok::<_, super::DbError>(organisations)
            })
            .await;
        holder.join().unwrap();
        assert!(written.is_ok(), "{written:?}");
        let stored: i64 = db
            .read(|conn| {
                crate::on_backend!(conn, |c| job_runs::table.count().get_result(c))
                    .map_err(super::DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(stored, 1);
    }

    /// A bulk file's transaction gets a page cache twice the writer's on a connection of its own, so no pooled
    /// connection is left holding 128 MiB of pages.
    #[test]
    fn a_long_write_gets_a_large_page_cache_on_its_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cpis.db").display());
        let mut config = crate::config::Settings::for_database(&url).database;
        config.pool_size = 1;
        let db = super::Db::connect(&config).unwrap();
        db.migrate().unwrap();
        // The pool's only connection is free while the long write runs: the write is not on it.
        let (own, pooled) = db
            .write_blocking(|conn| {
                let pooled = cache_size(&mut *db.get()?);
                Ok::<_, super::DbError>((cache_size(conn), pooled))
            })
            .unwrap();
        assert_eq!(own, -131072, "the long write has a cache of 128 MiB");
        assert_eq!(
            pooled, -2000,
            "a pooled connection keeps a reader's (SQLite's default)"
        );
        let after = cache_size(&mut db.get().unwrap());
        assert_eq!(after, -2000);
    }

    /// The group-commit writer's connection has the writer's page cache and leaves checkpoints to the
    /// checkpointer until the WAL reaches 128 MiB; a pooled connection has SQLite's defaults.
    #[tokio::test]
    async fn the_writer_has_a_large_cache_and_checkpoints_itself_only_past_128_mib_of_wal() {
        fn settings(conn: &mut super::DbConnection) -> (i64, i64, i64) {
            (
                cache_size(conn),
                wal_autocheckpoint(conn),
                synchronous(conn),
            )
        }
        let (_dir, db) = migrated_sqlite();
        let writer = db
            .write(|conn| Ok::<_, super::DbError>(settings(conn)))
            .await
            .unwrap();
        // The writer's commits are synced apart ([`super::durable`]); every other connection syncs its own.
        assert_eq!(writer, (-65536, 32768, 1));
        assert_eq!(settings(&mut db.get().unwrap()), (-2000, 1000, 2));
        let long = db
            .write_blocking(|conn| Ok::<_, super::DbError>(settings(conn)))
            .unwrap();
        assert_eq!(long, (-131072, 0, 2));
    }

    /// Each write through the group-commit writer is answered only once a sync of the WAL that began after its
    /// batch committed has returned, on SQLite, where the writer itself does not sync.
    #[tokio::test]
    async fn a_write_is_answered_only_once_the_wal_holding_its_commit_is_synced() {
        use super::schema::job_runs;
        use diesel::prelude::*;
        let (_dir, db) = migrated_sqlite();
        let durable = db.durable.clone().expect("SQLite syncs apart");
        let mut writes = Vec::new();
        for i in 0..200 {
            let (db, d, inside) = (db.clone(), durable.clone(), durable.clone());
            writes.push(tokio::spawn(async move {
                let batch = db
                    .write(move |conn| {
                        let at = chrono::Utc::now().naive_utc();
                        crate::on_backend!(conn, |c| diesel::insert_into(job_runs::table)
                            .values((
                                job_runs::name.eq(format!("sync-{i:03}")),
                                job_runs::last_tick.eq(at)
                            ))
                            .execute(c))?;
                        // Inside the batch: its commit takes the next number.
                        Ok::<_, super::DbError>(inside.numbered() + 1)
                    })
                    .await
                    .unwrap();
                assert!(
                    d.synced() >= batch,
                    "answered before batch {batch} was synced"
                );
            }));
        }
        for w in writes {
            w.await.unwrap();
        }
        assert!(db.stats.syncs.get() >= 1);
        assert!(db.stats.syncs.get() <= db.stats.batches.get());
        let count = db
            .read(|conn| {
                let n: i64 = crate::on_backend!(conn, |c| job_runs::table
                    .filter(job_runs::name.like("sync-%"))
                    .count()
                    .get_result(c))?;
                Ok::<_, super::DbError>(n)
            })
            .await
            .unwrap();
        assert_eq!(count, 200);
    }

    /// While the WAL's sync is held back, a committed write is visible to a read made before a write of the
    /// reader's own, but neither the write nor a read answered alone is answered; both are once the sync runs.
    #[tokio::test]
    async fn until_the_wal_is_synced_neither_the_write_nor_a_read_of_it_answered_alone_is_answered()
    {
        use super::schema::job_runs;
        use diesel::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpis.db");
        let url = format!("sqlite://{}", path.display());
        let db = super::Db::connect(&crate::config::Settings::for_database(&url).database).unwrap();
        db.migrate().unwrap();
        let count = |conn: &mut super::DbConnection| {
            let n: i64 = crate::on_backend!(conn, |c| job_runs::table.count().get_result(c))?;
            Ok::<_, super::DbError>(n)
        };
        let held = super::durable::Hold::new(&path);
        let write = tokio::spawn({
            let db = db.clone();
            async move {
                let at = chrono::Utc::now().naive_utc();
                db.write(move |conn| {
                    crate::on_backend!(conn, |c| diesel::insert_into(job_runs::table)
                        .values((job_runs::name.eq("held"), job_runs::last_tick.eq(at)))
                        .execute(c))
                    .map_err(super::DbError::from)
                })
                .await
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db.read_before_write(count).await.unwrap() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the write never committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let read = tokio::spawn({
            let db = db.clone();
            async move { db.read(count).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !write.is_finished(),
            "the write was answered before its sync"
        );
        assert!(
            !read.is_finished(),
            "a read of it was answered before its sync"
        );
        drop(held);
        write.await.unwrap().unwrap();
        assert_eq!(read.await.unwrap().unwrap(), 1);
    }

    /// Under steady writes with a reader always busy beside them, the checkpointer makes the WAL start over
    /// (here past 64 frames), so the file stays a fraction of what was written to it, and every write is kept.
    #[tokio::test]
    async fn the_wal_starts_over_under_steady_writes_and_reads_and_nothing_is_lost() {
        use super::schema::job_runs;
        use diesel::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpis.db");
        let url = format!("sqlite://{}", path.display());
        let db = super::Db::connect(&crate::config::Settings::for_database(&url).database).unwrap();
        db.migrate().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    job_runs::table
                        .count()
                        .get_result::<i64>(&mut conn)
                        .unwrap();
                    reads += 1;
                }
                reads
            })
        };
        let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let wal_path = dir.path().join("cpis.db-wal");
        let started = std::time::Instant::now();
        let mut writes = 0i64;
        let mut first_restart = None;
        let mut restarts = 0;
        // Writes go on for at least 1.5 s, and on a slow or busy machine until the WAL has started over four
        // times (its header's checkpoint sequence number moved on that often), or fail after 30 s.
        while started.elapsed() < std::time::Duration::from_millis(1500) || restarts < 4 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "the WAL started over {restarts} times in 30 s ({writes} writes)"
            );
            if let Some(seq) = wal_checkpoint_sequence(&wal_path) {
                restarts = seq.wrapping_sub(*first_restart.get_or_insert(seq));
            }
            let name = format!("probe-{writes:06}");
            db.write(move |conn| {
                crate::on_backend!(&mut *conn, |c| diesel::insert_into(job_runs::table)
                    .values((job_runs::name.eq(name), job_runs::last_tick.eq(at)))
                    .execute(c))
                .map_err(super::DbError::from)
            })
            .await
            .unwrap();
            writes += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        // Each write commits about two 4 KiB frames: a WAL that never starts over held 37 MB after 4,171 writes,
        // 8.9 KB a write. One that starts over is as long as the most written between two restarts. That is a
        // tenth of the run when the checkpointer keeps its turns, and up to a quarter was seen when other tests
        // kept it from them on a busy machine; a WAL that never started over would hold it all.
        let wal = std::fs::metadata(&wal_path).unwrap().len();
        assert!(writes > 300, "only {writes} writes");
        assert!(
            wal < writes as u64 * 4096,
            "WAL of {wal} bytes after {writes} writes and {restarts} restarts"
        );
        // Syncing the database file beside SQLite (before each restart) and the WAL (after each commit) must not
        // close a descriptor of SQLite's files: POSIX drops every lock the process holds on a file when any of
        // its descriptors closes, and another process could then take the database and remove the live WAL.
        assert!(
            holds_a_lock_on(&path),
            "the process no longer holds its shared lock on the database file"
        );
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        assert_eq!(
            job_runs::table
                .count()
                .get_result::<i64>(&mut conn)
                .unwrap(),
            writes
        );
        super::assert_sound(&mut conn);
    }

    /// The checkpoint sequence number in the header of the SQLite WAL at `path` (big-endian, bytes 12 to 16),
    /// which SQLite moves on each time the WAL starts over from its beginning; `None` before the first write.
    fn wal_checkpoint_sequence(path: &std::path::Path) -> Option<u32> {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut header))
            .ok()?;
        Some(u32::from_be_bytes([
            header[12], header[13], header[14], header[15],
        ]))
    }

    /// Whether this process holds a POSIX lock on the file at `path` (`/proc/locks`).
    fn holds_a_lock_on(path: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(path).unwrap().ino().to_string();
        let pid = std::process::id().to_string();
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| {
                f.len() >= 6
                    && f[1] == "POSIX"
                    && f[4] == pid
                    && f[5].rsplit(':').next() == Some(inode.as_str())
            })
    }

    /// A migrated SQLite database in memory.
    pub(crate) fn memory_sqlite() -> super::DbConnection {
        use diesel::Connection;
        use diesel_migrations::MigrationHarness;
        super::configure_sqlite();
        let mut conn = diesel::SqliteConnection::establish(":memory:").unwrap();
        conn.run_pending_migrations(super::SQLITE_MIGRATIONS)
            .unwrap();
        super::DbConnection::Sqlite(conn)
    }

    /// Runs `f` on a SQLite connection and answers, beside its result, SQLite's plan (`EXPLAIN QUERY PLAN`, one
    /// line per step) for each query `f` ran, as diesel sent it.
    pub(crate) fn query_plans<T>(
        conn: &mut super::DbConnection,
        f: impl FnOnce(&mut super::DbConnection) -> T,
    ) -> (T, Vec<Vec<String>>) {
        use diesel::connection::{Connection, InstrumentationEvent};
        use diesel::prelude::*;
        use std::sync::{Arc, Mutex};
        #[derive(QueryableByName)]
        struct Step {
            #[diesel(sql_type = diesel::sql_types::Text)]
            detail: String,
        }
        let super::DbConnection::Sqlite(c) = conn else {
            panic!("query plans are read on SQLite")
        };
        let queries = Arc::new(Mutex::new(Vec::new()));
        let seen = queries.clone();
        c.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                // diesel shows a query as its SQL followed by ` -- binds: [...]`.
                let sql = query.to_string();
                let sql = sql.split(" -- binds").next().unwrap_or_default();
                seen.lock().unwrap().push(sql.to_string());
            }
        });
        let result = f(conn);
        // Taken before the plans are asked for: those queries are seen too.
        let queries: Vec<String> = queries.lock().unwrap().clone();
        let super::DbConnection::Sqlite(c) = conn else {
            unreachable!()
        };
        let plans = queries
            .iter()
            .map(|sql| {
                diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
                    .load::<Step>(c)
                    .unwrap()
                    .into_iter()
                    .map(|s| s.detail)
                    .collect()
            })
            .collect();
        (result, plans)
    }

    /// Asserts that [`query_plans`] saw one query, with a step naming `step`, and answers that query's plan.
    pub(crate) fn one_plan_with<'a>(plans: &'a [Vec<String>], step: &str) -> &'a [String] {
        let [plan] = plans else {
            panic!("one query: {plans:?}")
        };
        assert!(plan.iter().any(|s| s.contains(step)), "{step}: {plan:?}");
        plan
    }

    /// SQLite's busy timeout running out is contention (worth sending again); a broken constraint is not.
    #[test]
    fn a_write_lock_held_past_the_busy_timeout_is_contention_and_a_duplicate_key_is_not() {
        use diesel::connection::SimpleConnection;
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("lock.db").display().to_string();
        let mut holder = diesel::SqliteConnection::establish(&url).unwrap();
        let mut waiter = diesel::SqliteConnection::establish(&url).unwrap();
        holder
            .batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .unwrap();
        holder.batch_execute("BEGIN IMMEDIATE").unwrap();
        waiter.batch_execute("PRAGMA busy_timeout = 10").unwrap();
        let locked = waiter.batch_execute("BEGIN IMMEDIATE").unwrap_err();
        assert!(super::is_contention(&locked), "{locked:?}");
        assert!(!super::is_unreachable(&locked));
        let duplicate = holder
            .batch_execute("INSERT INTO t VALUES (1)")
            .unwrap_err();
        assert!(!super::is_contention(&duplicate), "{duplicate:?}");
        assert!(!super::is_contention(&diesel::result::Error::NotFound));
    }

    #[test]
    fn batch_inserts_write_every_row_whatever_the_count_and_keep_absent_values_null() {
        use super::{insert_accesses, models::AccessRow, schema::accesses};
        use diesel::prelude::*;
        let mut conn = memory_sqlite();
        let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        type Stored = (String, Option<String>, Option<String>, Option<String>);
        let mut total = 0;
        // Around each chunk size (64, 16, 4, 1) and across several of them.
        for count in [0usize, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 85, 150] {
            let rows: Vec<AccessRow> = (0..count)
                .map(|i| AccessRow {
                    id: format!("{count}-{i}"),
                    nhs_number: "9434765919".into(),
                    at: at.into(),
                    setting_ods: "RX1".into(),
                    setting_type: (i % 2 == 0).then(|| "ED".to_string()),
                    kind: "check".into(),
                    access: "unscheduled".into(),
                    practitioner_name: None,
                    practitioner_role: None,
                    key_id: Some(format!("key-{i}")),
                })
                .collect();
            assert_eq!(insert_accesses(&mut conn, &rows).unwrap(), count);
            total += count as i64;
            let stored: Vec<Stored> = crate::on_backend!(&mut conn, |c| accesses::table
                .filter(accesses::id.like(format!("{count}-%")))
                .select((
                    accesses::id,
                    accesses::setting_type,
                    accesses::practitioner_name,
                    accesses::key_id
                ))
                .order(accesses::id)
                .load(c))
            .unwrap();
            let mut expected: Vec<_> = rows
                .iter()
                .map(|r| (r.id.clone(), r.setting_type.clone(), None, r.key_id.clone()))
                .collect();
            expected.sort();
            assert_eq!(stored, expected, "{count} rows");
        }
        let all: i64 =
            crate::on_backend!(&mut conn, |c| accesses::table.count().get_result(c)).unwrap();
        assert_eq!(all, total);
    }

    /// A check that hits lists the child's recent unscheduled accesses, newest first. SQLite answers that query
    /// from the `accesses_recent` index alone (one leaf for most children), with no visit to the table for each
    /// access and no sort, and the list is still the right one.
    #[test]
    fn recent_accesses_come_newest_first_from_their_covering_index() {
        use super::models::AccessRow;
        let mut conn = memory_sqlite();
        let day = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let access = |id: &str, nhs: &str, hour: u32, access: &str| AccessRow {
            at: day.and_hms_opt(hour, 0, 0).unwrap().into(),
            nhs_number: nhs.into(),
            access: access.into(),
            ..super::deferred::tests::access(id)
        };
        let rows = [
            access("a-09", "9434765919", 9, "unscheduled"),
            access("a-12", "9434765919", 12, "unscheduled"),
            access("a-11", "9434765919", 11, "scheduled"),
            access("b-13", "9434765870", 13, "unscheduled"),
            access("a-10", "9434765919", 10, "unscheduled"),
        ];
        super::insert_accesses(&mut conn, &rows).unwrap();
        let (recent, plans) = query_plans(&mut conn, |c| {
            AccessRow::recent_unscheduled(c, "9434765919", 25).unwrap()
        });
        let ids: Vec<&str> = recent.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["a-12", "a-10", "a-09"]);
        let plan = one_plan_with(
            &plans,
            "SEARCH accesses USING COVERING INDEX accesses_recent",
        );
        assert!(!plan.iter().any(|s| s.contains("TEMP B-TREE")), "{plan:?}");
    }

    /// A multi-row insert whose 70th row breaks the unique key stops there (`INSERT OR FAIL`), and the savepoint
    /// its caller runs in takes every row of it back, while the surrounding transaction's rows stay; a
    /// transaction that fails takes back everything.
    #[test]
    fn a_multi_row_insert_that_fails_part_way_leaves_nothing_once_its_savepoint_rolls_back() {
        use super::{insert_accesses, models::AccessRow, schema::accesses, DbConnection};
        use diesel::prelude::*;
        let mut conn = memory_sqlite();
        let row = |id: String| super::deferred::tests::access(&id);
        // 128 new rows whose 70th repeats the id "kept".
        let breaking = |prefix: &str| -> Vec<AccessRow> {
            (0..128)
                .map(|i| {
                    row(if i == 69 {
                        "kept".into()
                    } else {
                        format!("{prefix}{i}")
                    })
                })
                .collect()
        };
        let count = |conn: &mut DbConnection| -> i64 {
            crate::on_backend!(conn, |c| accesses::table.count().get_result(c)).unwrap()
        };
        let outcome = conn.transaction(|conn| {
            insert_accesses(conn, &[row("kept".into())])?;
            // 128 rows: two statements of 64; the second breaks on its sixth row (the 70th).
            let rows = breaking("r");
            let failed = conn.transaction(|conn| insert_accesses(conn, &rows));
            match failed {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) => {}
                other => panic!("the duplicate fails the insert: {other:?}"),
            }
            assert_eq!(
                count(conn),
                1,
                "the savepoint took back all 69 rows before the failure"
            );
            Ok::<_, diesel::result::Error>(())
        });
        outcome.unwrap();
        assert_eq!(count(&mut conn), 1);
        // Without a savepoint of its own, the failing statement keeps the rows before the one that broke it
        // (`FAIL`; `ABORT` would take back the second statement's five), until the transaction rolls back.
        let rows = breaking("s");
        let rolled_back = conn.transaction(|conn| {
            assert!(insert_accesses(conn, &rows).is_err());
            assert_eq!(
                count(conn),
                1 + 69,
                "INSERT OR FAIL stops at the failing row"
            );
            Err::<(), _>(diesel::result::Error::RollbackTransaction)
        });
        assert!(rolled_back.is_err());
        assert_eq!(count(&mut conn), 1);
        let kept: Vec<String> =
            crate::on_backend!(&mut conn, |c| accesses::table.select(accesses::id).load(c))
                .unwrap();
        assert_eq!(kept, ["kept"]);
    }
}
