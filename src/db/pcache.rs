//! SQLite's own page cache (pcache1) behind a thin layer that skips truncations with nothing to drop.
//!
//! When SQLite balances a B-tree it puts new sibling pages in page-number order by swapping them through a
//! temporary number: the lock-byte page just past 1 GiB, which never holds data. pcache1 remembers the largest
//! page number it has seen since its last truncation, so on a database under 1 GiB that temporary number makes
//! the truncation at the end of every such transaction walk the connection's whole cache looking for pages
//! past the end of the file, though the page has long been renumbered. For the writer's 64 MiB cache that walk
//! was 13% of the writer thread under attendances on a 300,000-person database. This layer counts pages parked
//! on the temporary number and the largest number created or moved to otherwise, and passes a truncation on
//! only when a page could be at or past its limit; every other call goes straight to pcache1.

use libsqlite3_sys::{sqlite3_pcache, sqlite3_pcache_methods2, sqlite3_pcache_page};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// SQLite's lock-byte offset (`PENDING_BYTE`, 1 GiB unless a test build moves it).
const PENDING_BYTE: u32 = 0x4000_0000;

/// What one cache may hold past a truncation limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// The number SQLite parks pages on while it swaps them (the lock-byte page).
    temp: u32,
    /// The largest page number created or moved to, other than `temp`, since the last truncation passed on.
    max_key: u32,
    /// Pages moved to `temp` and not yet moved away.
    parked: u32,
}

impl Bounds {
    fn new(page_size: u32) -> Self {
        Bounds {
            temp: PENDING_BYTE / page_size.max(1) + 1,
            max_key: 0,
            parked: 0,
        }
    }

    fn fetched(&mut self, key: u32) {
        // A fetch that may create is counted whether it found the page or made it (pcache1 counts only the
        // pages it makes; counting more only passes more truncations on). A page made on the temporary number
        // is counted as any other, so truncations below it pass until one drops it.
        self.max_key = self.max_key.max(key);
    }

    fn rekeyed(&mut self, old: u32, new: u32) {
        if old == self.temp && self.parked > 0 {
            self.parked -= 1;
        }
        if new == self.temp {
            self.parked += 1;
        } else {
            self.max_key = self.max_key.max(new);
        }
    }

    /// Whether a page numbered `limit` or more may be in the cache.
    fn must_truncate(&self, limit: u32) -> bool {
        self.parked > 0 || self.max_key >= limit
    }

    fn truncated(&mut self, limit: u32) {
        self.max_key = self.max_key.min(limit.saturating_sub(1));
        if limit <= self.temp {
            self.parked = 0;
        }
    }
}

/// One cache: pcache1's, and what it may hold.
struct Cache {
    inner: *mut sqlite3_pcache,
    bounds: Bounds,
}

struct Inner(sqlite3_pcache_methods2);
// SAFETY: the methods are plain function pointers and pcache1's `pArg` (null), never written after they are
// read once at start-up.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();
/// Whether SQLite took this layer (it refuses once it has started).
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Truncations not passed on, counted in test builds only (the count is not needed on the commit path).
#[cfg(test)]
static SKIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn inner() -> &'static sqlite3_pcache_methods2 {
    &INNER.get().expect("installed before SQLite starts").0
}

/// # Safety
/// `p` was returned by [`x_create`] and not yet destroyed.
unsafe fn cache<'a>(p: *mut sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: per the function's contract; SQLite calls a cache's methods from one connection at a time.
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    let m = inner();
    // SAFETY: pcache1's own initialiser with its own argument.
    unsafe { m.xInit.map_or(libsqlite3_sys::SQLITE_OK, |f| f(m.pArg)) }
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {
    let m = inner();
    if let Some(f) = m.xShutdown {
        // SAFETY: as above.
        unsafe { f(m.pArg) }
    }
}

unsafe extern "C" fn x_create(page: c_int, extra: c_int, purgeable: c_int) -> *mut sqlite3_pcache {
    let Some(create) = inner().xCreate else {
        return std::ptr::null_mut();
    };
    // SAFETY: SQLite's arguments, passed on.
    let made = unsafe { create(page, extra, purgeable) };
    if made.is_null() {
        return made;
    }
    let cache = Box::new(Cache {
        inner: made,
        bounds: Bounds::new(page.max(1) as u32),
    });
    Box::into_raw(cache) as *mut sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut sqlite3_pcache, n: c_int) {
    // SAFETY: `p` is one of ours (SQLite only passes caches this layer created).
    let c = unsafe { cache(p) };
    if let Some(f) = inner().xCachesize {
        // SAFETY: pcache1's cache, as created.
        unsafe { f(c.inner, n) }
    }
}

unsafe extern "C" fn x_pagecount(p: *mut sqlite3_pcache) -> c_int {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    // SAFETY: as above.
    inner().xPagecount.map_or(0, |f| unsafe { f(c.inner) })
}

unsafe extern "C" fn x_fetch(
    p: *mut sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut sqlite3_pcache_page {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    let Some(f) = inner().xFetch else {
        return std::ptr::null_mut();
    };
    // SAFETY: as above.
    let page = unsafe { f(c.inner, key, create) };
    if create != 0 && !page.is_null() {
        c.bounds.fetched(key);
    }
    page
}

unsafe extern "C" fn x_unpin(
    p: *mut sqlite3_pcache,
    page: *mut sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().xUnpin {
        // SAFETY: as above; the page came from this cache.
        unsafe { f(c.inner, page, discard) }
    }
}

unsafe extern "C" fn x_rekey(
    p: *mut sqlite3_pcache,
    page: *mut sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().xRekey {
        // SAFETY: as above.
        unsafe { f(c.inner, page, old, new) }
    }
    c.bounds.rekeyed(old, new);
}

unsafe extern "C" fn x_truncate(p: *mut sqlite3_pcache, limit: c_uint) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if !c.bounds.must_truncate(limit) {
        #[cfg(test)]
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(f) = inner().xTruncate {
        // SAFETY: as above.
        unsafe { f(c.inner, limit) }
    }
    c.bounds.truncated(limit);
}

unsafe extern "C" fn x_destroy(p: *mut sqlite3_pcache) {
    // SAFETY: `p` came from `x_create` as a boxed `Cache`, and SQLite destroys each cache once.
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    if let Some(f) = inner().xDestroy {
        // SAFETY: pcache1's cache, destroyed once.
        unsafe { f(c.inner) }
    }
}

unsafe extern "C" fn x_shrink(p: *mut sqlite3_pcache) {
    // SAFETY: as above.
    let c = unsafe { cache(p) };
    if let Some(f) = inner().xShrink {
        // SAFETY: as above.
        unsafe { f(c.inner) }
    }
}

/// Puts the layer in front of SQLite's page cache. Must run before SQLite initialises (the first connection);
/// if SQLite has already started, pcache1 stays as it is.
pub(super) fn install() {
    let mut default = std::mem::MaybeUninit::<sqlite3_pcache_methods2>::zeroed();
    // SAFETY: SQLITE_CONFIG_GETPCACHE2 writes the current methods into the struct it is given.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_config(
            libsqlite3_sys::SQLITE_CONFIG_GETPCACHE2,
            default.as_mut_ptr(),
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK {
        tracing::debug!(
            rc,
            "SQLite was already initialised; its page cache stays as it is"
        );
        return;
    }
    // SAFETY: filled in by SQLite above.
    let default = unsafe { default.assume_init() };
    if INNER.set(Inner(default)).is_err() {
        return;
    }
    let methods = sqlite3_pcache_methods2 {
        iVersion: 1,
        pArg: std::ptr::null_mut(),
        xInit: Some(x_init),
        xShutdown: Some(x_shutdown),
        xCreate: Some(x_create),
        xCachesize: Some(x_cachesize),
        xPagecount: Some(x_pagecount),
        xFetch: Some(x_fetch),
        xUnpin: Some(x_unpin),
        xRekey: Some(x_rekey),
        xTruncate: Some(x_truncate),
        xDestroy: Some(x_destroy),
        xShrink: Some(x_shrink),
    };
    // SAFETY: SQLITE_CONFIG_PCACHE2 copies the methods before it returns.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_config(
            libsqlite3_sys::SQLITE_CONFIG_PCACHE2,
            &methods as *const sqlite3_pcache_methods2,
        )
    };
    if rc == libsqlite3_sys::SQLITE_OK {
        INSTALLED.store(true, Ordering::Relaxed);
    } else {
        tracing::debug!(
            rc,
            "SQLite was already initialised; its page cache stays as it is"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Bounds, Ordering, INSTALLED, SKIPPED};
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    /// Random keys into an indexed table, so that B-tree pages split and are swapped into order.
    fn insert(conn: &mut SqliteConnection, from: i64, rows: i64) {
        conn.batch_execute(&format!(
            "WITH RECURSIVE r(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM r WHERE i < {last}) \
             INSERT INTO t (k, v) SELECT abs(random()) % 1000000007, printf('%040d', i) FROM r;",
            last = from + rows - 1
        ))
        .unwrap();
    }

    /// Through the real SQLite: the layer is installed and skips truncations on a database under 1 GiB, and
    /// with it a transaction that grew the file and was rolled back leaves a sound database with exactly the
    /// committed rows. (That a skipped truncation never had a page to drop is shown against a model above:
    /// SQLite re-initialises pages past the end of its file, so a wrong skip would not show here.)
    #[test]
    fn a_database_stays_sound_when_a_grown_transaction_rolls_back_behind_the_layer() {
        crate::db::configure_sqlite();
        assert!(
            INSTALLED.load(Ordering::Relaxed),
            "the layer is in front of SQLite's page cache"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
        conn.batch_execute(
            "PRAGMA journal_mode = WAL; PRAGMA cache_size = -65536; \
             CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT NOT NULL); \
             CREATE INDEX t_k ON t (k);",
        )
        .unwrap();
        let skipped = SKIPPED.load(Ordering::Relaxed);
        for round in 0..20 {
            conn.batch_execute("BEGIN").unwrap();
            insert(&mut conn, round * 2_000, 2_000);
            conn.batch_execute("COMMIT").unwrap();
        }
        assert!(
            SKIPPED.load(Ordering::Relaxed) > skipped,
            "commits after balancing skip the walk of the cache"
        );
        // A transaction grows the file well past its committed end, then rolls back.
        conn.batch_execute("BEGIN").unwrap();
        insert(&mut conn, 100_000, 30_000);
        conn.batch_execute("ROLLBACK").unwrap();
        // The pages it had added are numbered again by the next transaction.
        conn.batch_execute("BEGIN").unwrap();
        insert(&mut conn, 200_000, 30_000);
        conn.batch_execute("COMMIT").unwrap();
        crate::db::assert_sound(&mut conn);
        let count: Count = diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(count.n, 70_000);
        let rolled_back: Count =
            diesel::sql_query("SELECT count(*) AS n FROM t WHERE id >= 100000 AND id < 130000")
                .get_result(&mut conn)
                .unwrap();
        assert_eq!(
            rolled_back.n, 0,
            "nothing of the rolled-back transaction is left"
        );
        // A second connection reads the file itself, not this connection's cache.
        let mut other = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
        crate::db::assert_sound(&mut other);
    }

    #[test]
    fn a_page_swapped_through_the_lock_byte_number_does_not_make_every_truncation_pass() {
        let mut b = Bounds::new(4096);
        assert_eq!(b.temp, 262_145);
        for key in 1..=500 {
            b.fetched(key);
        }
        // A balance: page 480 goes to the temporary number, 470 to 480, then the first to 470.
        b.rekeyed(480, b.temp);
        assert!(b.must_truncate(501), "a page is parked past the limit");
        b.rekeyed(470, 480);
        b.rekeyed(b.temp, 470);
        assert!(!b.must_truncate(501), "nothing at or past 501 is left");
        assert!(b.must_truncate(500), "page 500 is");
    }

    #[test]
    fn pages_past_the_limit_make_it_pass_and_a_truncation_lowers_the_bound() {
        let mut b = Bounds::new(4096);
        for key in 1..=600 {
            b.fetched(key);
        }
        // A rolled-back transaction had grown the file to 600 pages; it is 500 again.
        assert!(b.must_truncate(501));
        b.truncated(501);
        assert!(!b.must_truncate(501));
        b.rekeyed(10, 700);
        assert!(b.must_truncate(501), "a page moved past the limit counts");
    }

    /// Random fetches, balances through the temporary number, discards and truncations against a model of the
    /// pages the cache holds: a truncation is never skipped while a page at or past its limit is held.
    #[test]
    fn a_truncation_is_never_skipped_while_a_page_at_or_past_its_limit_is_held() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |below: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(below)) as u32
        };
        let mut b = Bounds::new(4096);
        let mut held = std::collections::BTreeSet::new();
        let mut skipped = 0;
        for _ in 0..200_000 {
            let size = 1 + held
                .iter()
                .copied()
                .filter(|&k| k != b.temp)
                .max()
                .unwrap_or(0);
            match next(12) {
                0..=3 => {
                    let key = 1 + next(size + 20);
                    held.insert(key);
                    b.fetched(key);
                }
                4 | 5 => {
                    // A balance swaps two held pages through the temporary number.
                    let keys: Vec<u32> = held.iter().copied().filter(|&k| k != b.temp).collect();
                    if keys.len() >= 2 {
                        let x = keys[next(keys.len() as u32) as usize];
                        let y = keys[next(keys.len() as u32) as usize];
                        if x != y && !held.contains(&b.temp) {
                            for (old, new) in [(x, b.temp), (y, x), (b.temp, y)] {
                                held.remove(&old);
                                held.insert(new);
                                b.rekeyed(old, new);
                            }
                        }
                    }
                }
                6 => {
                    // A page moved to a number not held, past the end or not.
                    let keys: Vec<u32> = held.iter().copied().collect();
                    let new = 1 + next(size + 20);
                    if !keys.is_empty() && !held.contains(&new) && new != b.temp {
                        let old = keys[next(keys.len() as u32) as usize];
                        held.remove(&old);
                        held.insert(new);
                        b.rekeyed(old, new);
                    }
                }
                7 => {
                    // A page parked on the temporary number, or one parked there moved off it.
                    if held.contains(&b.temp) {
                        let new = 1 + next(size + 20);
                        if !held.contains(&new) {
                            held.remove(&b.temp);
                            held.insert(new);
                            b.rekeyed(b.temp, new);
                        }
                    } else {
                        let keys: Vec<u32> = held.iter().copied().collect();
                        if !keys.is_empty() {
                            let old = keys[next(keys.len() as u32) as usize];
                            held.remove(&old);
                            held.insert(b.temp);
                            b.rekeyed(old, b.temp);
                        }
                    }
                }
                8 => {
                    // A page dropped from the cache (the layer does not see which).
                    let keys: Vec<u32> = held.iter().copied().collect();
                    if !keys.is_empty() {
                        held.remove(&keys[next(keys.len() as u32) as usize]);
                    }
                }
                _ => {
                    let limit = 1 + next(size + 10);
                    if b.must_truncate(limit) {
                        held.retain(|&k| k < limit);
                        b.truncated(limit);
                    } else {
                        skipped += 1;
                        assert!(
                            held.range(limit..).next().is_none(),
                            "skipped a truncation at {limit} holding {:?}",
                            held.range(limit..).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
        assert!(
            skipped > 1_000,
            "the model exercised skipped truncations ({skipped})"
        );
    }

    #[test]
    fn a_page_created_on_the_temporary_number_keeps_truncations_passing() {
        let mut b = Bounds::new(4096);
        b.fetched(b.temp);
        assert!(b.must_truncate(100));
        b.truncated(100);
        assert!(!b.must_truncate(100));
    }
}
