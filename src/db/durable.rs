//! SQLite commits made durable beside the group-commit writer instead of inside it.
//!
//! With `synchronous = FULL` every commit waits for its `fsync` of the WAL while holding the write lock, and the
//! writer can do nothing else meanwhile. On a slow disk under flag checks that sync was a third of the writer's
//! time (p50 1.9 ms), with a core left idle (BENCHMARKS.md, fourteenth session). So the writer's own connection
//! commits with `synchronous = NORMAL`, which writes the commit's frames to the WAL file and syncs nothing, and
//! hands the batch's answers to this module's syncer thread, which syncs the WAL file and only then answers them.
//! The writer runs the next batch while the sync of the last one is in progress, and the syncer's one sync
//! covers every batch committed before it began.
//!
//! What a write is told is therefore what `FULL` told it: its reply comes only once its commit is on disk.
//!
//! - A commit's frames are in the WAL file (the kernel's copy of it) when `COMMIT` returns: SQLite writes them
//!   before it publishes the commit, and the WAL layer ([`super::walbuf`]) writes what it gathered at the commit
//!   frame. A sync that starts after that makes them durable, whichever descriptor it uses.
//! - The syncer syncs the WAL through a SQLite connection of its own ([`Files`]), which keeps the file open (it is
//!   removed only when the last connection closes) and never closes a descriptor of it beside SQLite.
//! - WAL frames of a committed transaction are only written over after a checkpoint has copied them into the
//!   database and synced it, and SQLite syncs the WAL's new header at each restart under `NORMAL` too.
//!
//! Readers see a commit as soon as it is made, before the sync. A reply built from a read alone could then show
//! what a crash would lose, so [`Durable::settle`] makes such a reply wait until everything committed before its
//! read ended is synced ([`super::Db::read`], [`super::Db::run`]). A read followed by a write needs no wait of its
//! own: the write's reply waits for a sync that covers every earlier commit.
//!
//! Measured (BENCHMARKS.md, change 52): where each WAL sync took 1.3 ms longer, flag checks gained 13 to 17% and
//! attendances 20 to 28%. On a disk whose syncs take 0.6 ms, throughput was within the noise and misses lost 3 to
//! 5%: the writer commits twice as often, in batches half the size.
//!
//! A sync that fails fails every write it would have made durable, with the database unavailable: the commit is
//! in the WAL and visible, but nobody is told it stands. A repeated attendance is recognised by its source
//! reference, so the sender's retry is answered with the stored one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use super::{Completion, DbError};
use libsqlite3_sys as ffi;

/// Numbers the writer's commits and says how far they are synced.
pub struct Durable {
    /// The number of the writer's last commit, taken just before it is made, so any read that saw the commit ends
    /// after it was taken.
    numbered: AtomicU64,
    /// The last batch number whose commit (and every earlier one) is synced.
    synced: tokio::sync::watch::Sender<u64>,
}

/// A batch the writer committed, or tried to, with the answers that wait for its sync.
pub struct Committed {
    pub number: u64,
    pub completions: Vec<Completion>,
}

impl Durable {
    pub fn new() -> Self {
        Self {
            numbered: AtomicU64::new(0),
            synced: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The number of the commit about to be made. Every number taken must reach the syncer ([`Committed`]),
    /// whether or not the commit succeeded, or a read that saw it would wait for ever.
    pub fn next_commit(&self) -> u64 {
        self.numbered.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until every batch committed before now is synced: called once a read has ended, before its result
    /// is answered. Returns at once when nothing is waiting for a sync.
    pub async fn settle(&self) {
        let seen = self.numbered.load(Ordering::SeqCst);
        if *self.synced.borrow() >= seen {
            return;
        }
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`.
        let _ = synced.wait_for(|n| *n >= seen).await;
    }

    /// How far the commits are synced.
    #[cfg(test)]
    pub fn synced(&self) -> u64 {
        *self.synced.borrow()
    }

    /// The number of the last commit.
    #[cfg(test)]
    pub fn numbered(&self) -> u64 {
        self.numbered.load(Ordering::SeqCst)
    }
}

/// A SQLite connection of its own, opened without diesel and never used for a query after it opens, whose file
/// handles the syncer and the checkpointer sync.
///
/// A file of SQLite's must never be synced through a descriptor opened beside SQLite's: closing it would drop
/// every POSIX lock the process holds on that file (locks belong to the process and the file, and any close of
/// the file releases them). For the database file that includes the shared lock each connection holds in WAL
/// mode, after which another process (a `cpis` command, a backup) could take the database for itself and remove
/// the WAL the server is still writing. The WAL file is synced through this connection's own handle on it
/// (`SQLITE_FCNTL_JOURNAL_POINTER`), the database file through its handle on that (`SQLITE_FCNTL_FILE_POINTER`).
/// While this connection is open the WAL file is never removed, since the last connection to close removes it.
pub struct Files {
    db: *mut ffi::sqlite3,
    #[cfg(test)]
    path: std::path::PathBuf,
}

// SAFETY: the connection is used by one thread at a time (the one that owns this), as SQLite's multi-thread mode
// allows.
unsafe impl Send for Files {}

impl Files {
    /// Opens the database at `path` and reads its schema, which opens its WAL.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let name =
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mut db = std::ptr::null_mut();
        // SAFETY: a NUL-terminated path and an out pointer; the default VFS ([`super::walbuf`]).
        let rc = unsafe {
            ffi::sqlite3_open_v2(
                name.as_ptr(),
                &mut db,
                ffi::SQLITE_OPEN_READWRITE,
                std::ptr::null(),
            )
        };
        // Closed on drop whether or not the open succeeded, as SQLite asks.
        let files = Self {
            db,
            #[cfg(test)]
            path: path.to_path_buf(),
        };
        check(rc)?;
        // SAFETY: an open connection; the SQL is NUL-terminated and has no callback.
        let rc = unsafe {
            ffi::sqlite3_busy_timeout(db, 10_000);
            ffi::sqlite3_exec(
                db,
                c"SELECT count(*) FROM sqlite_schema".as_ptr(),
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        check(rc)?;
        Ok(files)
    }

    /// Syncs the file SQLite gives for `op` (a file-pointer control).
    fn sync(&self, op: std::ffi::c_int) -> std::io::Result<()> {
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: an open connection; both controls write one `sqlite3_file` pointer.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                self.db,
                c"main".as_ptr(),
                op,
                &mut file as *mut *mut ffi::sqlite3_file as *mut std::ffi::c_void,
            )
        };
        check(rc)?;
        // SAFETY: SQLite's own open file (or one never opened, whose methods are null), owned by this connection.
        let sync = unsafe { file.as_ref() }
            .and_then(|f| unsafe { f.pMethods.as_ref() })
            .and_then(|m| m.xSync)
            .ok_or_else(|| std::io::Error::other("SQLite has no such file open"))?;
        // SAFETY: as above; a normal sync, as SQLite's own commits and checkpoints make.
        check(unsafe { sync(file, ffi::SQLITE_SYNC_NORMAL) })
    }

    /// Syncs the WAL: every commit written to it before this call is durable when it returns.
    pub fn sync_wal(&self) -> std::io::Result<()> {
        #[cfg(test)]
        while HELD.lock().unwrap().contains(&self.path) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.sync(ffi::SQLITE_FCNTL_JOURNAL_POINTER)
    }

    /// Syncs the database file.
    pub fn sync_database(&self) -> std::io::Result<()> {
        self.sync(ffi::SQLITE_FCNTL_FILE_POINTER)
    }
}

/// A SQLite result code as an I/O result.
fn check(rc: std::ffi::c_int) -> std::io::Result<()> {
    if rc == ffi::SQLITE_OK {
        return Ok(());
    }
    // SAFETY: sqlite3_errstr returns a static string for any code.
    let why = unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errstr(rc)) };
    Err(std::io::Error::other(format!(
        "SQLite error {rc}: {}",
        why.to_string_lossy()
    )))
}

/// Runs `sync` on the files kept in `kept`, opening them first when there are none. After a failure they are
/// dropped, to be opened again next time.
pub fn with_files(
    kept: &mut Option<Files>,
    database: &std::path::Path,
    sync: impl FnOnce(&Files) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let files = match kept.take() {
        Some(f) => f,
        None => Files::open(database)?,
    };
    sync(&files)?;
    *kept = Some(files);
    Ok(())
}

impl Drop for Files {
    fn drop(&mut self) {
        // SAFETY: the connection (possibly one that failed to open) is closed once; it has no statements.
        unsafe { ffi::sqlite3_close(self.db) };
    }
}

/// Databases whose WAL syncs wait, in tests ([`Hold`]).
#[cfg(test)]
static HELD: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Holds back the syncs of one database's WAL until dropped, in tests.
#[cfg(test)]
pub struct Hold(std::path::PathBuf);

#[cfg(test)]
impl Hold {
    pub fn new(database: &std::path::Path) -> Self {
        HELD.lock().unwrap().push(database.to_path_buf());
        Self(database.to_path_buf())
    }
}

#[cfg(test)]
impl Drop for Hold {
    fn drop(&mut self) {
        HELD.lock().unwrap().retain(|db| *db != self.0);
    }
}

/// The syncer: takes every batch committed since its last sync, syncs once, then answers them all. Stops when the
/// writer does.
pub fn syncer_loop(
    durable: &Durable,
    mut sync: impl FnMut() -> std::io::Result<()>,
    batches: Receiver<Committed>,
    syncs: &prometheus::IntCounter,
) {
    while let Ok(first) = batches.recv() {
        let mut number = first.number;
        let mut completions = first.completions;
        while let Ok(more) = batches.try_recv() {
            number = more.number;
            completions.extend(more.completions);
        }
        let outcome = sync();
        syncs.inc();
        let failure = outcome.err().map(|e| {
            tracing::error!(error = %e, "the WAL could not be synced; the writes it held are answered as failed");
            DbError::Unavailable(format!("the write could not be made durable: {e}"))
        });
        // Readers are released either way: a failed sync leaves nothing better to wait for.
        durable.synced.send_replace(number);
        for complete in completions {
            complete(failure.as_ref());
        }
    }
}

/// Starts the syncer on a thread of its own; what is sent on the answer is synced and answered in order.
pub fn spawn(
    durable: std::sync::Arc<Durable>,
    database: std::path::PathBuf,
    syncs: prometheus::IntCounter,
) -> std::io::Result<Sender<Committed>> {
    let (to_sync, batches) = std::sync::mpsc::channel();
    // Opened at the first sync (the database has been migrated by then), and again after a failure.
    let mut files: Option<Files> = None;
    let sync = move || with_files(&mut files, &database, Files::sync_wal);
    std::thread::Builder::new()
        .name("cpis-db-sync".into())
        .spawn(move || syncer_loop(&durable, sync, batches, &syncs))?;
    Ok(to_sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Answers = Arc<Mutex<Vec<(u32, Option<String>)>>>;

    fn answered(answers: &Answers, id: u32) -> Completion {
        let answers = answers.clone();
        Box::new(move |failure| {
            answers
                .lock()
                .unwrap()
                .push((id, failure.map(|e| e.to_string())))
        })
    }

    /// A syncer whose syncs each wait for a go-ahead and then report what the test chose.
    fn gated() -> (
        Arc<Durable>,
        Sender<Committed>,
        std::sync::mpsc::SyncSender<std::io::Result<()>>,
        std::thread::JoinHandle<()>,
    ) {
        let durable = Arc::new(Durable::new());
        let (go, gate) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(0);
        let (to_sync, batches) = std::sync::mpsc::channel();
        let d = durable.clone();
        let syncer = std::thread::spawn(move || {
            let counter = prometheus::IntCounter::new("syncs", "syncs").unwrap();
            syncer_loop(&d, || gate.recv().unwrap(), batches, &counter)
        });
        (durable, to_sync, go, syncer)
    }

    /// Hands the syncer a batch, as the writer does after a commit.
    fn hand(to_sync: &Sender<Committed>, number: u64, completions: Vec<Completion>) {
        to_sync
            .send(Committed {
                number,
                completions,
            })
            .unwrap();
    }

    fn wait_for(answers: &Answers, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while answers.lock().unwrap().len() < count {
            assert!(std::time::Instant::now() < deadline, "no answer came");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn writes_are_answered_only_after_a_sync_and_one_sync_covers_every_batch_before_it() {
        let (durable, to_sync, go, syncer) = gated();
        let answers: Answers = Arc::default();
        let first = durable.next_commit();
        hand(&to_sync, first, vec![answered(&answers, 1)]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            answers.lock().unwrap().is_empty(),
            "answered before any sync"
        );
        // Two more batches commit while the first sync is in progress (the syncer has taken the first).
        let (second, third) = (durable.next_commit(), durable.next_commit());
        for (number, id) in [(second, 2), (third, 3)] {
            hand(&to_sync, number, vec![answered(&answers, id)]);
        }
        go.send(Ok(())).unwrap();
        wait_for(&answers, 1);
        assert_eq!(*answers.lock().unwrap(), vec![(1, None)]);
        assert_eq!(durable.synced(), first);
        // One more sync answers both later batches.
        go.send(Ok(())).unwrap();
        wait_for(&answers, 3);
        assert_eq!(
            *answers.lock().unwrap(),
            vec![(1, None), (2, None), (3, None)]
        );
        assert_eq!(durable.synced(), third);
        drop(to_sync);
        syncer.join().unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_writes_it_held_and_still_releases_readers() {
        let (durable, to_sync, go, syncer) = gated();
        let answers: Answers = Arc::default();
        let number = durable.next_commit();
        hand(
            &to_sync,
            number,
            vec![answered(&answers, 1), answered(&answers, 2)],
        );
        go.send(Err(std::io::Error::other("disk gone"))).unwrap();
        wait_for(&answers, 2);
        let answers = answers.lock().unwrap().clone();
        for (_, failure) in &answers {
            let failure = failure.as_deref().expect("told it failed");
            assert!(failure.contains("could not be made durable"), "{failure}");
            assert!(failure.contains("disk gone"), "{failure}");
        }
        assert_eq!(durable.synced(), number);
        drop(to_sync);
        syncer.join().unwrap();
    }

    #[tokio::test]
    async fn a_read_settles_only_once_what_was_committed_before_it_ended_is_synced() {
        let (durable, to_sync, go, syncer) = gated();
        // Nothing committed: no wait.
        tokio::time::timeout(std::time::Duration::from_secs(5), durable.settle())
            .await
            .expect("nothing to wait for");
        let number = durable.next_commit();
        let settled = tokio::spawn({
            let durable = durable.clone();
            async move { durable.settle().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!settled.is_finished(), "settled before the sync");
        // A commit numbered after the read ended is not waited for.
        let later = durable.next_commit();
        hand(&to_sync, number, Vec::new());
        go.send(Ok(())).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), settled)
            .await
            .expect("settled once synced")
            .unwrap();
        assert!(durable.synced() < later);
        drop(to_sync);
        drop(go);
        syncer.join().unwrap();
    }

    #[test]
    fn the_wal_and_the_database_are_synced_through_sqlite_s_own_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpis.db");
        let url = format!("sqlite://{}", path.display());
        let db = super::super::Db::connect(&crate::config::Settings::for_database(&url).database)
            .unwrap();
        db.migrate().unwrap();
        let files = Files::open(&path).expect("opened");
        files.sync_wal().expect("WAL synced");
        files.sync_database().expect("database synced");
        assert!(Files::open(&dir.path().join("no-such-folder").join("x.db")).is_err());
    }
}
