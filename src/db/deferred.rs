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
//! On PostgreSQL an attendance's row waits for the batch's end too, where its insert skips any attendance already
//! stored with the same setting and id (`ON CONFLICT DO NOTHING`, which also waits for another instance's batch
//! holding one). Before, each attendance was inserted at once so that its write could tell at once whether it was
//! a copy: a round trip the writer waited for on every attendance. Now a copy is found at the end: every row its
//! write buffered is dropped there, audit event included, and the write is told ([`CopyFound`]), to be answered
//! as a repeat once the batch has committed.
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
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct Deferred {
    pub accesses: Vec<AccessRow>,
    pub attendances: Vec<AttendanceRow>,
    pub notifications: Vec<NotificationRow>,
    pub deliveries: Vec<DeliveryRow>,
    /// Delivery endpoints read in this batch, by organisation (`None`: it has none).
    pub endpoints: HashMap<String, Option<EndpointRow>>,
    /// PostgreSQL: the buffered attendances that may turn out to be copies, with what their writes buffered.
    unsure: Vec<Unsure>,
    /// Buffered notifications a later write of the batch took as its own (the same visit, see
    /// [`crate::notify`]): kept even if the write that made them turns out to be a copy.
    pub reused: HashSet<String>,
}

/// Tells a write whose attendance waited for the batch's end whether it was a copy of one already stored: set
/// before the batch commits, so it is known once the write is answered. It keeps the attendance's setting and id,
/// by which the first copy is read then.
#[derive(Debug, Clone)]
pub struct CopyFound(Arc<Told>);

#[derive(Debug)]
struct Told {
    copy: AtomicBool,
    setting_ods: String,
    attendance_id: String,
}

impl CopyFound {
    pub fn is_copy(&self) -> bool {
        self.0.copy.load(Ordering::Acquire)
    }

    /// The attendance's setting and attendance id.
    pub fn source(&self) -> (&str, &str) {
        (&self.0.setting_ods, &self.0.attendance_id)
    }
}

/// An attendance buffered on PostgreSQL (the `attendance`-th, with this `id`), and the rows and audit events its
/// write buffered, from its start (`from`) to its attendance (`to`).
struct Unsure {
    attendance: usize,
    id: String,
    from: (Mark, usize),
    to: (Mark, usize),
    told: CopyFound,
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
    DEFERRED.with(|d| d.borrow().as_ref().map_or(Mark(0, 0, 0, 0), Deferred::mark))
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
            d.unsure.retain(|u| u.attendance < mark.1);
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

/// PostgreSQL: buffers an attendance whose insert at the batch's end may find an earlier copy; `since` is where
/// its write began, and everything the write buffered from there is dropped if it does. Gives the row back when
/// no batch is running.
pub fn keep_unsure(
    att: AttendanceRow,
    since: &super::JobMark,
) -> Result<CopyFound, Box<AttendanceRow>> {
    let audit = crate::audit::batch_mark();
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(d) => {
            let told = CopyFound(Arc::new(Told {
                copy: AtomicBool::new(false),
                setting_ods: att.setting_ods.clone(),
                attendance_id: att.attendance_id.clone(),
            }));
            d.unsure.push(Unsure {
                attendance: d.attendances.len(),
                id: att.id.clone(),
                from: (since.rows, since.audit),
                to: (d.mark(), audit),
                told: told.clone(),
            });
            d.attendances.push(att);
            Ok(told)
        }
        None => Err(Box::new(att)),
    })
}

impl Deferred {
    /// How far each buffer has grown.
    fn mark(&self) -> Mark {
        Mark(
            self.accesses.len(),
            self.attendances.len(),
            self.notifications.len(),
            self.deliveries.len(),
        )
    }

    /// Drops the rows of each write whose attendance was not `stored` (a copy), latest first so that the earlier
    /// writes' places stand, and tells the write. A notification that a later write took as its own is kept,
    /// with its deliveries: that write's visit is told through it.
    fn drop_copies(&mut self, stored: &HashSet<String>) {
        for u in std::mem::take(&mut self.unsure).into_iter().rev() {
            if stored.contains(&u.id) {
                continue;
            }
            u.told.0.copy.store(true, Ordering::Release);
            let (from, to) = (u.from.0, u.to.0);
            self.accesses.drain(from.0..to.0);
            let made = &self.notifications[from.2..to.2];
            if !made.iter().any(|n| self.reused.contains(&n.id)) {
                self.notifications.drain(from.2..to.2);
                self.deliveries.drain(from.3..to.3);
            }
            crate::audit::batch_remove(u.from.1..u.to.1);
        }
    }
}

/// Runs `f` on this thread's buffer when a batch is running; `None` outside one.
pub fn with<R>(f: impl FnOnce(&mut Deferred) -> R) -> Option<R> {
    DEFERRED.with(|d| d.borrow_mut().as_mut().map(f))
}

/// Inserts the batch's buffered rows, parents before children (notifications before their deliveries), and
/// leaves the buffer empty for the next batch. Call before the batch's audit events are chained: a copy's event
/// is dropped here.
pub fn flush(conn: &mut DbConnection) -> Result<(), Error> {
    let Some(mut rows) = DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take)) else {
        return Ok(());
    };
    // Attendances first: a copy among them takes its write's other rows out.
    if rows.unsure.is_empty() {
        super::insert_attendances(conn, &rows.attendances)?;
    } else {
        // In one order, by setting and attendance id (stable: of two copies the first stays first), so that two
        // instances storing the same attendances at once never wait on each other crosswise, which PostgreSQL
        // would end by failing one of the two batches.
        rows.attendances.sort_by(|a, b| {
            (&a.setting_ods, &a.attendance_id).cmp(&(&b.setting_ods, &b.attendance_id))
        });
        let stored = super::insert_new_attendances(conn, &rows.attendances)?;
        if stored.len() < rows.attendances.len() {
            rows.drop_copies(&stored);
        }
    }
    super::insert_accesses(conn, &rows.accesses)?;
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

    /// One write's rows: an access, and a notification with its delivery unless `reuses` one of the batch's;
    /// an audit event; then its attendance, buffered as on PostgreSQL.
    fn write(conn: &mut DbConnection, id: &str, reuses: Option<&str>) -> CopyFound {
        use crate::db::stamp::Stamp;
        let since = crate::db::JobMark::now();
        assert!(keep(access(id), |d| &mut d.accesses).is_none());
        match reuses {
            Some(earlier) => with(|d| d.reused.insert(earlier.to_string())).map(|_| ()),
            None => {
                let at = access(id).at;
                let notification = NotificationRow {
                    id: format!("n-{id}"),
                    org_ods: "LA1".into(),
                    event: "attendance.flagged".into(),
                    status: "pending".into(),
                    review: false,
                    nhs_number: None,
                    setting_ods: None,
                    setting_type: None,
                    attendance_ref: Some(id.into()),
                    occurred_at: at,
                    payload: None,
                    created_at: at,
                    updated_at: at,
                };
                assert!(keep(notification, |d| &mut d.notifications).is_none());
                with(|d| {
                    d.deliveries.push(DeliveryRow {
                        notification_id: format!("n-{id}"),
                        channel: "webhook".into(),
                        target: "https://la1.example".into(),
                        status: "pending".into(),
                        attempts: 0,
                        next_attempt_at: Stamp(*at),
                        lease_until: None,
                        leased_by: None,
                        last_error: None,
                        delivered_at: None,
                    })
                })
            }
        };
        let actor = crate::audit::Actor {
            org: "RBT01".into(),
            key_id: None,
            role: None,
            request_id: None,
            practitioner: None,
        };
        let event = crate::audit::Event {
            action: "attendance.create",
            subject: Some(id),
            outcome: "flagged",
            ..Default::default()
        };
        crate::audit::append(conn, *access(id).at, &actor, event).unwrap();
        let att = AttendanceRow {
            id: id.into(),
            ..crate::attendances::tests::attendance(None, None)
        };
        keep_unsure(att, &since).expect("a batch is running")
    }

    #[test]
    fn a_copy_found_at_the_batch_end_takes_out_its_writes_rows_but_not_a_notification_another_write_took(
    ) {
        let mut conn = crate::db::tests::memory_sqlite();
        begin();
        crate::audit::begin_batch();
        let a = write(&mut conn, "a", None);
        // b is a copy whose notification no one else took; c is a copy whose notification d took as its own.
        let b = write(&mut conn, "b", None);
        let c = write(&mut conn, "c", None);
        let d = write(&mut conn, "d", Some("n-c"));
        let stored: HashSet<String> = ["a", "d"].map(String::from).into();
        let left = with(|buffer| {
            buffer.drop_copies(&stored);
            let ids = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
            (
                ids(buffer.accesses.iter().map(|r| &r.id).collect()),
                ids(buffer.notifications.iter().map(|r| &r.id).collect()),
                ids(buffer
                    .deliveries
                    .iter()
                    .map(|r| &r.notification_id)
                    .collect()),
            )
        })
        .unwrap();
        let subjects = crate::audit::batch_subjects();
        abandon();
        crate::audit::abandon_batch();
        assert_eq!(left.0, ["a", "d"], "the copies' accesses go");
        assert_eq!(
            left.1,
            ["n-a", "n-c"],
            "b's notification goes; c's tells d's visit"
        );
        assert_eq!(
            left.2,
            ["n-a", "n-c"],
            "deliveries go with their notification"
        );
        assert_eq!(
            subjects,
            [Some("a".into()), Some("d".into())],
            "the copies' audit events go"
        );
        let told: Vec<bool> = [a, b, c, d].iter().map(CopyFound::is_copy).collect();
        assert_eq!(told, [false, true, true, false]);
    }
}
