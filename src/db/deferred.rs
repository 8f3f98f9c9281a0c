//! Rows the group-commit writer inserts at the end of its batch, several at a time, instead of one statement
//! each while the batch's writes run: a flag check's access, an attendance's own row, and the outbox rows
//! (notifications and their deliveries) of checks and attendances. Like the audit events, they are written in
//! the batch's own transaction, so they commit with the writes that made them or not at all; a write that
//! fails has its rows dropped. Outside the writer (the blocking write of a bulk file, tests), rows are inserted
//! at once.
//!
//! Inside a batch, whatever looks these rows up again reads the buffer as well as the table (the visit window
//! of [`crate::notify`], an attendance's notifications, a repeated attendance).
//!
//! The batch also keeps the delivery endpoints its writes have read ([`crate::notify::EndpointRow::find`]): every
//! flag check that hits and every flagged attendance reads its authority's, and on PostgreSQL each read is a
//! round trip the writer waits for. A write to an endpoint forgets it, and a failed write forgets them all.

use super::DbConnection;
use crate::attendances::AttendanceRow;
use crate::db::models::AccessRow;
use crate::notify::{DeliveryRow, EndpointRow, NotificationRow};
use diesel::result::Error;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
pub struct Deferred {
    pub accesses: Vec<AccessRow>,
    pub attendances: Vec<AttendanceRow>,
    pub notifications: Vec<NotificationRow>,
    pub deliveries: Vec<DeliveryRow>,
    /// Delivery endpoints read in this batch, by organisation (`None`: it has none).
    pub endpoints: HashMap<String, Option<EndpointRow>>,
}

thread_local! {
    /// Set by the group-commit writer for the length of a batch.
    static DEFERRED: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

/// How far each buffer had grown before a write, to drop that write's rows if it fails.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize, usize, usize, usize);

/// Starts buffering this thread's rows (the writer, at the start of a batch).
pub fn begin() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Deferred::default()));
}

/// Drops the buffered rows without writing them (the batch's transaction failed).
pub fn abandon() {
    DEFERRED.with(|d| *d.borrow_mut() = None);
}

pub fn mark() -> Mark {
    DEFERRED.with(|d| match d.borrow().as_ref() {
        Some(d) => Mark(
            d.accesses.len(),
            d.attendances.len(),
            d.notifications.len(),
            d.deliveries.len(),
        ),
        None => Mark(0, 0, 0, 0),
    })
}

/// Drops the rows buffered since `mark` (the write that made them failed), and the endpoints read, which that
/// write may have changed before its savepoint was rolled back.
pub fn truncate(mark: Mark) {
    DEFERRED.with(|d| {
        if let Some(d) = d.borrow_mut().as_mut() {
            d.accesses.truncate(mark.0);
            d.attendances.truncate(mark.1);
            d.notifications.truncate(mark.2);
            d.deliveries.truncate(mark.3);
            d.endpoints.clear();
        }
    });
}

/// Buffers `row` in the batch's buffer that `buffer` picks; gives it back when no batch is running, for the
/// caller to insert at once.
pub fn keep<T>(row: T, buffer: impl FnOnce(&mut Deferred) -> &mut Vec<T>) -> Option<T> {
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(d) => {
            buffer(d).push(row);
            None
        }
        None => Some(row),
    })
}

/// Runs `f` on this thread's buffer when a batch is running; `None` outside one.
pub fn with<R>(f: impl FnOnce(&mut Deferred) -> R) -> Option<R> {
    DEFERRED.with(|d| d.borrow_mut().as_mut().map(f))
}

/// Inserts the batch's buffered rows, parents before children (notifications before their deliveries), and
/// leaves the buffer empty for the next batch.
pub fn flush(conn: &mut DbConnection) -> Result<(), Error> {
    let Some(rows) = DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take)) else {
        return Ok(());
    };
    super::insert_accesses(conn, &rows.accesses)?;
    super::insert_attendances(conn, &rows.attendances)?;
    super::insert_notifications(conn, &rows.notifications)?;
    super::insert_deliveries(conn, &rows.deliveries)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::NaiveDate;

    /// An access row with the given id (shared with the batch-insert tests).
    pub(crate) fn access(id: &str) -> AccessRow {
        AccessRow {
            id: id.into(),
            nhs_number: "9434765919".into(),
            at: NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .into(),
            setting_ods: "RX1".into(),
            setting_type: None,
            kind: "check".into(),
            access: "unscheduled".into(),
            practitioner_name: None,
            practitioner_role: None,
            key_id: None,
        }
    }

    #[test]
    fn a_failed_write_drops_only_its_own_rows_and_nothing_is_buffered_outside_a_batch() {
        assert!(keep(access("outside"), |d| &mut d.accesses).is_some());
        begin();
        assert!(keep(access("first"), |d| &mut d.accesses).is_none());
        let before_second = mark();
        assert!(keep(access("second"), |d| &mut d.accesses).is_none());
        truncate(before_second);
        let ids: Vec<String> = with(|d| d.accesses.iter().map(|a| a.id.clone()).collect()).unwrap();
        assert_eq!(ids, vec!["first".to_string()]);
        abandon();
        assert!(with(|_| ()).is_none());
    }
}
