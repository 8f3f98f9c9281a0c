//! SQLite's write-ahead log written once per commit, not twice per page.
//!
//! SQLite appends each page of a commit to the WAL as two writes, the frame's 24-byte header and then the page,
//! so a commit of 75 pages is 150 `pwrite` calls before its `fsync`. The writer's profile under attendances
//! (300,000 persons) had those calls at a sixth of its time, most of it per-call cost in the kernel rather than
//! copying. This thin VFS, registered as the process's default in front of SQLite's own (`unix`), gathers a
//! WAL file's consecutive writes in memory and hands them to the real file as one write:
//!
//! - after the page that follows a commit frame's header (a header whose "database size after commit" field is
//!   not zero), so a commit's frames are in the file before SQLite publishes them to readers in the WAL index,
//!   whatever the `synchronous` setting;
//! - before anything that reads, syncs, sizes, truncates, controls or closes the file, so SQLite never sees the
//!   file without its own earlier writes (a long transaction reading back a page it spilled, a checkpoint run by
//!   the same connection);
//! - before a write that does not continue the gathered run (SQLite rewriting a frame already in the log), and
//!   when the run reaches [`FLUSH_AT`].
//!
//! Nothing is acknowledged earlier than before: a commit is durable when SQLite's `fsync` of the WAL returns,
//! and that sync writes the gathered run first. What a crash can lose is what it could lose before, frames of a
//! transaction that had not committed. Every other file (the database, the WAL index) and every other call go
//! straight to the real VFS.

use libsqlite3_sys as ffi;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// A gathered run is written once it is this large (a commit of about 250 pages).
const FLUSH_AT: usize = 1 << 20;
/// The most one write hands the real file: SQLite's unix VFS writes at most 128 KiB less one byte a call.
const WRITE_AT_MOST: usize = 31 * 4096;
/// Size of a WAL frame header.
const FRAME_HEADER: usize = 24;
/// The VFS's name (registered as the default).
const NAME: &[u8] = b"cpis-wal\0";

/// One open file: SQLite's `sqlite3_file` first (its methods are ours), then what this layer keeps; the real
/// VFS's file follows in the same allocation, at [`REAL_AT`].
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    wal: bool,
    /// The next write ends a commit: flush after it.
    commit_next: bool,
    /// File offset of `run[0]`.
    start: i64,
    run: Vec<u8>,
}

/// Where the real file starts in SQLite's allocation for a file (8-byte aligned, as SQLite aligns it).
const REAL_AT: usize = std::mem::size_of::<File>().div_ceil(8) * 8;

struct Real(*mut ffi::sqlite3_vfs);
// SAFETY: the real VFS is a static object of SQLite's, never freed, whose methods are thread-safe.
unsafe impl Send for Real {}
unsafe impl Sync for Real {}

static REAL: OnceLock<Real> = OnceLock::new();
/// Whether this VFS is registered.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
#[cfg(test)]
thread_local! {
    /// Writes SQLite asked of WAL files on this thread, and writes that reached them, in test builds only.
    static COUNTS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// # Safety
/// `f` is a file this VFS opened and has not closed.
unsafe fn file<'a>(f: *mut ffi::sqlite3_file) -> &'a mut File {
    // SAFETY: per the contract; SQLite uses a file from one connection at a time.
    unsafe { &mut *(f as *mut File) }
}

/// The real file's methods.
///
/// # Safety
/// `f` is a file this VFS opened and has not closed.
unsafe fn real(f: &File) -> &ffi::sqlite3_io_methods {
    // SAFETY: the real VFS opened `f.real` successfully (or `xOpen` failed and this file has no methods).
    unsafe { &*(*f.real).pMethods }
}

impl File {
    /// Writes the gathered run to the real file.
    ///
    /// # Safety
    /// `self` is an open file of this VFS.
    unsafe fn flush(&mut self) -> c_int {
        if self.run.is_empty() {
            return ffi::SQLITE_OK;
        }
        let Some(write) = real(self).xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut at = self.start;
        for piece in self.run.chunks(WRITE_AT_MOST) {
            // SAFETY: the real file is open; the piece is `piece.len()` bytes, which fits a c_int.
            rc = unsafe {
                write(
                    self.real,
                    piece.as_ptr() as *const c_void,
                    piece.len() as c_int,
                    at,
                )
            };
            #[cfg(test)]
            COUNTS.with(|c| c.set((c.get().0, c.get().1 + 1)));
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += piece.len() as i64;
        }
        self.run.clear();
        self.commit_next = false;
        rc
    }
}

/// Passes a call on to the real file, with its methods.
///
/// # Safety
/// `f` is a file this VFS opened and has not closed.
unsafe fn passed<T>(
    f: *mut ffi::sqlite3_file,
    then: impl FnOnce(*mut ffi::sqlite3_file, &ffi::sqlite3_io_methods) -> T,
) -> T {
    // SAFETY: per the contract.
    let this = unsafe { file(f) };
    // SAFETY: as above.
    then(this.real, unsafe { real(this) })
}

/// Writes out the gathered run, then passes the call on as [`passed`] does.
///
/// # Safety
/// `f` is a file this VFS opened and has not closed.
unsafe fn flushed(
    f: *mut ffi::sqlite3_file,
    then: impl FnOnce(*mut ffi::sqlite3_file, &ffi::sqlite3_io_methods) -> c_int,
) -> c_int {
    // SAFETY: per the contract.
    let rc = unsafe { file(f).flush() };
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    // SAFETY: as above.
    unsafe { passed(f, then) }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file it opened once.
    let this = unsafe { file(f) };
    // SAFETY: open until the real close below.
    let flushed = unsafe { this.flush() };
    // SAFETY: as above.
    let closed = unsafe {
        real(this)
            .xClose
            .map_or(ffi::SQLITE_OK, |close| close(this.real))
    };
    // SAFETY: the run was written in place by `x_open` and is dropped once, here.
    unsafe { std::ptr::drop_in_place(&mut this.run) };
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    out: *mut c_void,
    amount: c_int,
    at: i64,
) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| {
            m.xRead
                .map_or(ffi::SQLITE_IOERR_READ, |g| g(r, out, amount, at))
        })
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    at: i64,
) -> c_int {
    // SAFETY: an open file of ours.
    let this = unsafe { file(f) };
    if !this.wal || amount <= 0 {
        // SAFETY: as above.
        return unsafe {
            real(this).xWrite.map_or(ffi::SQLITE_IOERR_WRITE, |write| {
                write(this.real, data, amount, at)
            })
        };
    }
    #[cfg(test)]
    COUNTS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    // SAFETY: SQLite passes `amount` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, amount as usize) };
    let continues = !this.run.is_empty() && at == this.start + this.run.len() as i64;
    if !continues {
        // SAFETY: as above.
        let rc = unsafe { this.flush() };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        this.start = at;
    }
    let ends_commit = std::mem::take(&mut this.commit_next);
    this.run.extend_from_slice(bytes);
    // A frame header carries the database's size in pages after a commit in bytes 4 to 8, zero otherwise.
    if bytes.len() == FRAME_HEADER && bytes[4..8] != [0; 4] {
        this.commit_next = true;
    }
    if ends_commit || this.run.len() >= FLUSH_AT {
        // SAFETY: as above.
        return unsafe { this.flush() };
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| {
            m.xTruncate
                .map_or(ffi::SQLITE_IOERR_TRUNCATE, |g| g(r, size))
        })
    }
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| {
            m.xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |g| g(r, flags))
        })
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| {
            m.xFileSize.map_or(ffi::SQLITE_IOERR_FSTAT, |g| g(r, size))
        })
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| {
            m.xLock.map_or(ffi::SQLITE_IOERR_LOCK, |g| g(r, level))
        })
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| {
            m.xUnlock.map_or(ffi::SQLITE_IOERR_UNLOCK, |g| g(r, level))
        })
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| {
            m.xCheckReservedLock
                .map_or(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, |g| g(r, out))
        })
    }
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| {
            m.xFileControl
                .map_or(ffi::SQLITE_NOTFOUND, |g| g(r, op, arg))
        })
    }
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe { passed(f, |r, m| m.xSectorSize.map_or(4096, |g| g(r))) }
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe { passed(f, |r, m| m.xDeviceCharacteristics.map_or(0, |g| g(r))) }
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| match m.xShmMap {
            Some(g) if m.iVersion >= 2 => g(r, region, size, extend, out),
            _ => ffi::SQLITE_IOERR_SHMMAP,
        })
    }
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| match m.xShmLock {
            Some(g) if m.iVersion >= 2 => g(r, offset, n, flags),
            _ => ffi::SQLITE_IOERR_SHMLOCK,
        })
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| match m.xShmBarrier {
            Some(g) if m.iVersion >= 2 => g(r),
            _ => {}
        })
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| match m.xShmUnmap {
            Some(g) if m.iVersion >= 2 => g(r, delete),
            _ => ffi::SQLITE_OK,
        })
    }
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    at: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        flushed(f, |r, m| match m.xFetch {
            Some(g) if m.iVersion >= 3 => g(r, at, amount, out),
            _ => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        })
    }
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, at: i64, page: *mut c_void) -> c_int {
    // SAFETY: an open file of ours; passed on.
    unsafe {
        passed(f, |r, m| match m.xUnfetch {
            Some(g) if m.iVersion >= 3 => g(r, at, page),
            _ => ffi::SQLITE_OK,
        })
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(Real(vfs)) = REAL.get() else {
        return ffi::SQLITE_CANTOPEN;
    };
    // SAFETY: SQLite allocated `szOsFile` bytes for the file: this layer's part, then the real file's.
    let inner = unsafe { (f as *mut u8).add(REAL_AT) as *mut ffi::sqlite3_file };
    // SAFETY: the real VFS's open, on its part of the allocation.
    let rc = unsafe {
        match (**vfs).xOpen {
            Some(open) => open(*vfs, name, inner, flags, out_flags),
            None => ffi::SQLITE_CANTOPEN,
        }
    };
    if rc != ffi::SQLITE_OK {
        // SAFETY: SQLite reads `pMethods` to decide whether to close a file that failed to open.
        unsafe { (*f).pMethods = std::ptr::null() };
        // A real file that failed to open but set methods must still be closed, as SQLite would have.
        // SAFETY: as the real VFS left it.
        unsafe {
            if !(*inner).pMethods.is_null() {
                if let Some(close) = (*(*inner).pMethods).xClose {
                    close(inner);
                }
            }
        }
        return rc;
    }
    // SAFETY: the allocation is at least `REAL_AT` bytes for this layer's part; it is written once, here.
    unsafe {
        std::ptr::write(
            f as *mut File,
            File {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real: inner,
                wal: flags & ffi::SQLITE_OPEN_WAL != 0,
                commit_next: false,
                start: 0,
                run: Vec::new(),
            },
        )
    };
    ffi::SQLITE_OK
}

/// Registers the layer as the default VFS, in front of the one SQLite would have used. Runs once, after the
/// rest of SQLite's configuration (registering a VFS starts SQLite).
pub(super) fn install() {
    // SAFETY: looks up the default VFS; SQLite's VFS objects live as long as the process.
    let default = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
    if default.is_null() || REAL.set(Real(default)).is_err() {
        return;
    }
    // SAFETY: `default` is a valid VFS; its fields are copied, and its methods other than `xOpen` are used
    // as they are (they take the VFS only for its settings, which the copy keeps).
    let mut vfs: ffi::sqlite3_vfs = unsafe { *default };
    vfs.szOsFile = vfs.szOsFile.saturating_add(REAL_AT as c_int);
    vfs.pNext = std::ptr::null_mut();
    vfs.zName = NAME.as_ptr() as *const c_char;
    vfs.xOpen = Some(x_open);
    let vfs = Box::leak(Box::new(vfs));
    // SAFETY: the VFS object lives for the rest of the process (leaked); 1 makes it the default.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 1) };
    if rc == ffi::SQLITE_OK {
        INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        tracing::warn!(rc, "SQLite's WAL writes stay one per frame part");
    }
}

#[cfg(test)]
mod tests {
    use super::{COUNTS, INSTALLED};
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use std::sync::atomic::Ordering;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Totals {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total: i64,
    }

    fn open(path: &std::path::Path, settings: &str) -> SqliteConnection {
        crate::db::configure_sqlite();
        assert!(
            INSTALLED.load(Ordering::Relaxed),
            "the layer is SQLite's default VFS"
        );
        let mut conn = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
        conn.batch_execute(&format!("PRAGMA journal_mode = WAL; {settings}"))
            .unwrap();
        conn
    }

    /// Adds `rows` rows with random indexed keys, so that each commit touches many pages.
    fn insert(conn: &mut SqliteConnection, from: i64, rows: i64) {
        conn.batch_execute(&format!(
            "WITH RECURSIVE r(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM r WHERE i < {last}) \
             INSERT INTO t (id, k, v) SELECT i, abs(random()) % 1000000007, printf('%080d', i) FROM r;",
            last = from + rows - 1
        ))
        .unwrap();
    }

    fn totals(conn: &mut SqliteConnection) -> Totals {
        diesel::sql_query("SELECT count(*) AS n, coalesce(sum(id), 0) AS total FROM t")
            .get_result(conn)
            .unwrap()
    }

    fn expected(rows: i64) -> Totals {
        Totals {
            n: rows,
            total: rows * (rows + 1) / 2,
        }
    }

    const TABLE: &str =
        "CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT NOT NULL); \
                         CREATE INDEX t_k ON t (k);";

    /// A commit of many pages reaches the WAL file in a handful of writes, not two per page, and reads back
    /// whole, on the same connection, on another, and after the database is closed and opened again.
    #[test]
    fn a_commit_reaches_the_wal_in_a_few_writes_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(
            &path,
            "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0;",
        );
        conn.batch_execute(TABLE).unwrap();
        let before = COUNTS.with(|c| c.get());
        for round in 0..10 {
            insert(&mut conn, round * 500 + 1, 500);
        }
        let (asked, written) = COUNTS.with(|c| c.get());
        let (asked, written) = (asked - before.0, written - before.1);
        // Ten commits of 500 rows of about 100 bytes: well over 200 pages, two writes each.
        assert!(asked > 400, "SQLite asked for {asked} WAL writes");
        assert!(
            written <= 20,
            "{written} writes reached the WAL for {asked} asked, over ten commits"
        );
        assert_eq!(totals(&mut conn), expected(5000));
        let mut other = open(&path, "");
        assert_eq!(totals(&mut other), expected(5000));
        crate::db::assert_sound(&mut other);
        drop(other);
        drop(conn);
        let mut again = open(&path, "");
        assert_eq!(totals(&mut again), expected(5000));
        crate::db::assert_sound(&mut again);
    }

    /// With `synchronous = OFF` SQLite never syncs the WAL, so nothing but the end of a commit writes the
    /// gathered frames out: another connection must still read every commit as soon as it is made.
    #[test]
    fn another_connection_reads_each_commit_even_when_nothing_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut writer = open(&path, "PRAGMA synchronous = OFF;");
        writer.batch_execute(TABLE).unwrap();
        let mut reader = open(&path, "");
        for round in 0..20 {
            insert(&mut writer, round * 300 + 1, 300);
            assert_eq!(totals(&mut reader), expected((round + 1) * 300));
        }
        crate::db::assert_sound(&mut reader);
    }

    /// A transaction larger than its page cache spills pages to the WAL and reads them back before it
    /// commits; a rolled-back one leaves nothing behind.
    #[test]
    fn a_transaction_larger_than_its_cache_reads_back_what_it_spilled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(&path, "PRAGMA cache_size = 10; PRAGMA synchronous = FULL;");
        conn.batch_execute(TABLE).unwrap();
        conn.batch_execute("BEGIN").unwrap();
        insert(&mut conn, 1, 4000);
        assert_eq!(totals(&mut conn), expected(4000));
        conn.batch_execute("COMMIT").unwrap();
        conn.batch_execute("BEGIN").unwrap();
        insert(&mut conn, 4001, 4000);
        assert_eq!(totals(&mut conn), expected(8000));
        conn.batch_execute("ROLLBACK").unwrap();
        assert_eq!(totals(&mut conn), expected(4000));
        crate::db::assert_sound(&mut conn);
        let mut other = open(&path, "");
        assert_eq!(totals(&mut other), expected(4000));
        crate::db::assert_sound(&mut other);
    }
}
