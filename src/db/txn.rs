//! SQLite transactions begun and committed by statements diesel keeps prepared.
//!
//! Diesel's transaction manager runs `BEGIN` and `COMMIT` through `sqlite3_exec`, which parses them afresh every
//! time: twice per request for a read transaction, and twice per batch for the writer. `perf probe` on SQLite's
//! prepare calls showed nothing else prepared per request under load (BENCHMARKS.md, change 51). Here they are
//! statements of their own, found by type in diesel's statement cache, and the manager's transaction depth is
//! kept in step by hand, so that a `transaction` inside one is a savepoint as usual and diesel's own
//! `rollback_transaction` ends one.

use super::DbConnection;
use diesel::connection::{
    AnsiTransactionManager, TransactionDepthChange, TransactionManager, TransactionManagerStatus,
};
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::Error;
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::RunQueryDsl;

/// How a transaction begins: `BEGIN` (a read: the snapshot is taken at the first read) or `BEGIN IMMEDIATE` (a
/// write: the write lock is taken at once, see [`super::write_transaction`]).
pub const BEGIN: usize = 0;
pub const BEGIN_IMMEDIATE: usize = 1;
const COMMIT: usize = 2;

const SQL: [&str; 3] = ["BEGIN", "BEGIN IMMEDIATE", "COMMIT"];

/// One of [`SQL`], as a statement diesel keeps prepared (one type each, so each is found by type).
#[derive(Debug, Clone, Copy)]
struct Control<const K: usize>;

impl<const K: usize> QueryId for Control<K> {
    type QueryId = Self;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const K: usize> QueryFragment<Sqlite> for Control<K> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> diesel::QueryResult<()> {
        out.push_sql(SQL[K]);
        Ok(())
    }
}

impl<const K: usize> RunQueryDsl<SqliteConnection> for Control<K> {}

type Manager = AnsiTransactionManager;

fn status(c: &mut SqliteConnection) -> &mut TransactionManagerStatus {
    <Manager as TransactionManager<SqliteConnection>>::transaction_manager_status_mut(c)
}

fn sqlite(conn: &mut DbConnection) -> &mut SqliteConnection {
    match conn {
        DbConnection::Sqlite(c) => c,
        DbConnection::Postgres(_) => {
            unreachable!("SQLite transactions are begun on SQLite connections")
        }
    }
}

/// Begins a transaction on `conn` (SQLite) with `BEGIN` or `BEGIN IMMEDIATE` ([`BEGIN`], [`BEGIN_IMMEDIATE`]).
pub fn begin<const B: usize>(conn: &mut DbConnection) -> Result<(), Error> {
    let c = sqlite(conn);
    if status(c).transaction_depth()?.is_some() {
        return Err(Error::AlreadyInTransaction);
    }
    Control::<B>.execute(c)?;
    status(c)
        .transaction_state()?
        .change_transaction_depth(TransactionDepthChange::IncreaseDepth)
}

/// Commits the outermost transaction: on SQLite, one [`begin`] began, with `COMMIT` kept prepared (if it fails,
/// rolls back as diesel does and answers the commit's error, or both, with the manager marked broken, if the
/// rollback fails too); on PostgreSQL, through diesel's own manager.
pub fn commit(conn: &mut DbConnection) -> Result<(), Error> {
    let c = match conn {
        DbConnection::Sqlite(c) => c,
        DbConnection::Postgres(_) => {
            return <DbConnection as diesel::Connection>::TransactionManager::commit_transaction(
                conn,
            )
        }
    };
    match Control::<COMMIT>.execute(c) {
        Ok(_) => status(c)
            .transaction_state()?
            .change_transaction_depth(TransactionDepthChange::DecreaseDepth),
        Err(commit_error) => {
            match <Manager as TransactionManager<SqliteConnection>>::rollback_transaction(c) {
                Ok(()) => Err(commit_error),
                Err(rollback_error) => {
                    status(c).set_in_error();
                    Err(Error::RollbackErrorOnCommit {
                        rollback_error: Box::new(rollback_error),
                        commit_error: Box::new(commit_error),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::{Connection, InstrumentationEvent};
    use diesel::prelude::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn transactions_begin_and_commit_through_statements_prepared_once_and_savepoints_still_nest() {
        use crate::db::schema::job_runs;
        let mut conn = crate::db::tests::memory_sqlite();
        let cached = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = cached.clone();
        sqlite(&mut conn).set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { sql, .. } = event {
                seen.lock().unwrap().push(sql.to_string());
            }
        });
        let row = |name: &str| {
            (
                job_runs::name.eq(name.to_string()),
                job_runs::last_tick.eq(chrono::NaiveDateTime::default()),
            )
        };
        for n in 0..3 {
            begin::<BEGIN_IMMEDIATE>(&mut conn).unwrap();
            // A transaction inside is a savepoint: its failure undoes only itself.
            let failed = conn.transaction(|c| {
                diesel::insert_into(job_runs::table)
                    .values(row(&format!("undone {n}")))
                    .execute(c)?;
                Err::<(), _>(Error::RollbackTransaction)
            });
            assert!(failed.is_err());
            conn.transaction(|c| {
                diesel::insert_into(job_runs::table)
                    .values(row(&format!("nested {n}")))
                    .execute(c)
            })
            .unwrap();
            diesel::insert_into(job_runs::table)
                .values(row(&format!("kept {n}")))
                .execute(&mut conn)
                .unwrap();
            commit(&mut conn).unwrap();
        }
        // A begun transaction that is rolled back leaves nothing, and a second begin inside one is refused.
        begin::<BEGIN>(&mut conn).unwrap();
        assert!(matches!(
            begin::<BEGIN>(&mut conn),
            Err(Error::AlreadyInTransaction)
        ));
        diesel::insert_into(job_runs::table)
            .values(row("rolled back"))
            .execute(&mut conn)
            .unwrap();
        <DbConnection as Connection>::TransactionManager::rollback_transaction(&mut conn).unwrap();
        let mut names: Vec<String> = job_runs::table
            .select(job_runs::name)
            .load(&mut conn)
            .unwrap();
        names.sort();
        assert_eq!(
            names,
            vec!["kept 0", "kept 1", "kept 2", "nested 0", "nested 1", "nested 2"]
        );
        let cached = cached.lock().unwrap();
        for sql in SQL {
            let times = cached.iter().filter(|s| s.as_str() == sql).count();
            assert_eq!(times, 1, "{sql} prepared once and kept: {cached:?}");
        }
    }
}
