//! The audit trail: one event per read or write of a child's data, per check, and per key or organisation
//! change, appended in the caller's transaction. Events form a hash chain so that a changed, removed or
//! reordered event is detected by `verify`.

use crate::clock::format_timestamp;
use crate::db::schema::{audit_events, audit_head};
use crate::db::{advance_audit_head, lock_audit_head, DbConnection};
use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::result::Error;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who did something, from the request's key (or `cli` for the command line).
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub org: String,
    pub key_id: Option<String>,
    pub role: Option<String>,
    pub request_id: Option<String>,
    pub practitioner: Option<String>,
}

impl Actor {
    pub fn cli() -> Self {
        Actor {
            org: "cli".into(),
            role: Some("operator".into()),
            ..Default::default()
        }
    }

    pub fn with_practitioner(mut self, practitioner: Option<String>) -> Self {
        self.practitioner = practitioner;
        self
    }
}

/// What happened, to whom, and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Event<'a> {
    pub action: &'a str,
    pub nhs_number: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub outcome: &'a str,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, Serialize)]
#[diesel(table_name = audit_events, treat_none_as_default_value = false)]
pub struct AuditRow {
    pub seq: i64,
    pub at: String,
    pub actor_ods: String,
    pub key_id: Option<String>,
    pub role: Option<String>,
    pub practitioner: Option<String>,
    pub action: String,
    pub nhs_number: Option<String>,
    pub subject: Option<String>,
    pub outcome: String,
    pub request_id: Option<String>,
    pub detail: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields the hash covers, in a fixed order: serde_json writes struct fields in declaration order.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    at: &'a str,
    actor_ods: &'a str,
    key_id: Option<&'a str>,
    role: Option<&'a str>,
    practitioner: Option<&'a str>,
    action: &'a str,
    nhs_number: Option<&'a str>,
    subject: Option<&'a str>,
    outcome: &'a str,
    request_id: Option<&'a str>,
    detail: Option<&'a str>,
}

impl AuditRow {
    fn canonical(&self) -> String {
        let c = Canonical {
            seq: self.seq,
            at: &self.at,
            actor_ods: &self.actor_ods,
            key_id: self.key_id.as_deref(),
            role: self.role.as_deref(),
            practitioner: self.practitioner.as_deref(),
            action: &self.action,
            nhs_number: self.nhs_number.as_deref(),
            subject: self.subject.as_deref(),
            outcome: &self.outcome,
            request_id: self.request_id.as_deref(),
            detail: self.detail.as_deref(),
        };
        serde_json::to_string(&c).expect("audit canonical form always serialises")
    }

    fn compute_hash(&self) -> String {
        chain_hash(&self.prev_hash, &self.canonical())
    }
}

/// `SHA-256(prev_hash || canonical event)`, hex.
pub fn chain_hash(prev_hash: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// An event waiting, in the group-commit writer, to be chained when its batch commits.
struct Pending {
    at: String,
    actor: Actor,
    action: String,
    nhs_number: Option<String>,
    subject: Option<String>,
    outcome: String,
    detail: Option<String>,
}

thread_local! {
    /// Set by the group-commit writer for the length of a batch: events are chained and written together at the
    /// end of the batch, in the batch's transaction, instead of one head update each.
    static BATCH: std::cell::RefCell<Option<Vec<Pending>>> = const { std::cell::RefCell::new(None) };
}

/// Starts collecting this thread's audit events (the writer, at the start of a batch).
pub fn begin_batch() {
    BATCH.with(|b| *b.borrow_mut() = Some(Vec::new()));
}

/// How many events the batch holds, to undo a failed write's events.
pub fn batch_mark() -> usize {
    BATCH.with(|b| b.borrow().as_ref().map_or(0, Vec::len))
}

pub fn batch_truncate(mark: usize) {
    BATCH.with(|b| {
        if let Some(v) = b.borrow_mut().as_mut() {
            v.truncate(mark);
        }
    });
}

/// Drops the events in `range` from the batch (a write found to be a copy at the batch's end,
/// [`crate::db::deferred`]).
pub fn batch_remove(range: std::ops::Range<usize>) {
    BATCH.with(|b| {
        if let Some(v) = b.borrow_mut().as_mut() {
            v.drain(range);
        }
    });
}

/// The subjects of the batch's events, in order (tests).
#[cfg(test)]
pub(crate) fn batch_subjects() -> Vec<Option<String>> {
    BATCH.with(|b| {
        b.borrow()
            .iter()
            .flatten()
            .map(|p| p.subject.clone())
            .collect()
    })
}

/// Chains and writes the batch's events (one head lock, multi-row inserts, one head update), in order.
pub fn end_batch(conn: &mut DbConnection) -> Result<(), Error> {
    let pending = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
    write_chained(conn, pending)
}

/// Chains events after the current head and writes them: one head lock, multi-row inserts, one head update.
fn write_chained(conn: &mut DbConnection, pending: Vec<Pending>) -> Result<(), Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev) = lock_audit_head(conn)?;
    let mut rows = Vec::with_capacity(pending.len());
    for p in pending {
        seq += 1;
        let mut row = AuditRow {
            seq,
            at: p.at,
            actor_ods: p.actor.org,
            key_id: p.actor.key_id,
            role: p.actor.role,
            practitioner: p.actor.practitioner,
            action: p.action,
            nhs_number: p.nhs_number,
            subject: p.subject,
            outcome: p.outcome,
            request_id: p.actor.request_id,
            detail: p.detail,
            prev_hash: prev,
            hash: String::new(),
        };
        row.hash = row.compute_hash();
        prev = row.hash.clone();
        rows.push(row);
    }
    crate::db::insert_audit_rows(conn, &rows)?;
    advance_audit_head(conn, seq, &prev)
}

impl Pending {
    fn new(at: NaiveDateTime, actor: &Actor, event: Event<'_>) -> Self {
        Pending {
            at: format_timestamp(at),
            actor: actor.clone(),
            action: event.action.to_string(),
            nhs_number: event.nhs_number.map(str::to_string),
            subject: event.subject.map(str::to_string),
            outcome: event.outcome.to_string(),
            detail: event.detail,
        }
    }
}

/// Drops a batch's events without writing them (its transaction failed).
pub fn abandon_batch() {
    BATCH.with(|b| *b.borrow_mut() = None);
}

/// Appends one event to the chain; call inside the transaction that does what the event records. Inside the
/// group-commit writer the event joins its batch and is chained when the batch commits, in the same transaction.
pub fn append(
    conn: &mut DbConnection,
    at: NaiveDateTime,
    actor: &Actor,
    event: Event<'_>,
) -> Result<(), Error> {
    queue_or_write(conn, Pending::new(at, actor, event))
}

/// Joins the writer's batch when there is one; otherwise chains and writes the event at once.
fn queue_or_write(conn: &mut DbConnection, event: Pending) -> Result<(), Error> {
    let unqueued = BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(batch) => {
            batch.push(event);
            None
        }
        None => Some(event),
    });
    match unqueued {
        None => Ok(()),
        Some(event) => write_chained(conn, vec![event]),
    }
}

/// Records an event that goes with no other write (a check that found nothing, an audited read): it joins the
/// group-commit writer's next batch without a transaction of its own, and this answers once that batch has
/// committed.
pub async fn record(
    db: &crate::db::Db,
    at: NaiveDateTime,
    actor: &Actor,
    event: Event<'_>,
) -> Result<(), crate::db::DbError> {
    let event = Pending::new(at, actor, event);
    db.write_buffered(move |conn| queue_or_write(conn, event).map_err(crate::db::DbError::from))
        .await
}

/// Appends several events at once (a bulk file's rows): one head lock, one multi-row insert, one head update.
pub fn append_many(
    conn: &mut DbConnection,
    at: NaiveDateTime,
    actor: &Actor,
    events: Vec<Event<'_>>,
) -> Result<(), Error> {
    write_chained(
        conn,
        events
            .into_iter()
            .map(|e| Pending::new(at, actor, e))
            .collect(),
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub checked: i64,
    pub first_broken_seq: Option<i64>,
}

/// Walks the whole chain in order, in batches, and reports the first event that does not hold.
pub fn verify(conn: &mut DbConnection) -> Result<VerifyReport, Error> {
    const BATCH: i64 = 5_000;
    let (head_seq, head_hash, first_seq, first_prev): (i64, String, i64, String) =
        audit_head::table
            .find(1)
            .select((
                audit_head::last_seq,
                audit_head::last_hash,
                audit_head::first_seq,
                audit_head::first_prev_hash,
            ))
            .first(conn)?;
    // Events older than the retention period may have been deleted; the chain then starts at `first_seq`.
    let mut expected_seq = first_seq;
    let mut expected_prev = first_prev;
    let mut checked = 0;
    loop {
        let batch: Vec<AuditRow> = audit_events::table
            .filter(audit_events::seq.ge(expected_seq))
            .order(audit_events::seq.asc())
            .limit(BATCH)
            .select(AuditRow::as_select())
            .load(conn)?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            if row.seq != expected_seq
                || row.prev_hash != expected_prev
                || row.compute_hash() != row.hash
            {
                return Ok(VerifyReport {
                    ok: false,
                    checked,
                    first_broken_seq: Some(expected_seq),
                });
            }
            checked += 1;
            expected_seq += 1;
            expected_prev = row.hash.clone();
        }
    }
    // The head remembers the end of the chain, so removing the newest events is detected too.
    if head_seq != expected_seq - 1 || head_hash != expected_prev {
        return Ok(VerifyReport {
            ok: false,
            checked,
            first_broken_seq: Some(expected_seq),
        });
    }
    Ok(VerifyReport {
        ok: true,
        checked,
        first_broken_seq: None,
    })
}

#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    pub nhs_number: Option<String>,
    pub actor_ods: Option<String>,
    pub from: Option<NaiveDateTime>,
    pub to: Option<NaiveDateTime>,
    pub page: i64,
}

/// One page of events, newest first, with the total count.
pub fn search(
    conn: &mut DbConnection,
    filter: &SearchFilter,
) -> Result<(Vec<AuditRow>, i64), Error> {
    let page_size = crate::db::models::PAGE_SIZE;
    let filtered = || {
        let mut q = audit_events::table.into_boxed();
        if let Some(n) = &filter.nhs_number {
            q = q.filter(audit_events::nhs_number.eq(n.clone()));
        }
        if let Some(o) = &filter.actor_ods {
            q = q.filter(audit_events::actor_ods.eq(o.clone()));
        }
        if let Some(from) = filter.from {
            q = q.filter(audit_events::at.ge(format_timestamp(from)));
        }
        if let Some(to) = filter.to {
            q = q.filter(audit_events::at.lt(format_timestamp(to)));
        }
        q
    };
    let total = filtered().count().get_result(conn)?;
    let rows = filtered()
        .order(audit_events::seq.desc())
        .limit(page_size)
        .offset(filter.page.saturating_sub(1).saturating_mul(page_size))
        .select(AuditRow::as_select())
        .load(conn)?;
    Ok((rows, total))
}

/// The last event of the chain older than `before`: a purge removes it and every event before it, so that the
/// chain left is whole from its first event on.
pub fn last_before(conn: &mut DbConnection, before: NaiveDateTime) -> Result<Option<i64>, Error> {
    audit_events::table
        .filter(audit_events::at.lt(format_timestamp(before)))
        .order(audit_events::seq.desc())
        .select(audit_events::seq)
        .first(conn)
        .optional()
}

/// Removes the chain's oldest events, at most `at_most` of them and none after `last` ([`last_before`]), and moves
/// the chain's recorded start past them, so that `verify` checks what is left from its new first event. Answers
/// how many went: 0 once nothing up to `last` is left.
pub fn purge_through(conn: &mut DbConnection, last: i64, at_most: i64) -> Result<usize, Error> {
    lock_audit_head(conn)?;
    let first: i64 = audit_head::table
        .find(1)
        .select(audit_head::first_seq)
        .first(conn)?;
    // The chain's events are numbered without gaps from its first, so this is the `at_most`-th or `last`.
    let through = last.min(first.saturating_add(at_most.max(1) - 1));
    let Some(hash) = audit_events::table
        .filter(audit_events::seq.le(through))
        .order(audit_events::seq.desc())
        .select(audit_events::hash)
        .first::<String>(conn)
        .optional()?
    else {
        return Ok(0);
    };
    let deleted =
        diesel::delete(audit_events::table.filter(audit_events::seq.le(through))).execute(conn)?;
    diesel::update(audit_head::table.find(1))
        .set((
            audit_head::first_seq.eq(through + 1),
            audit_head::first_prev_hash.eq(hash),
        ))
        .execute(conn)?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, prev: &str) -> AuditRow {
        let mut r = AuditRow {
            seq,
            at: "2026-01-01T00:00:00.000000Z".into(),
            actor_ods: "RXK01".into(),
            key_id: None,
            role: Some("care_setting".into()),
            practitioner: None,
            action: "flag_check".into(),
            nhs_number: Some("9434765919".into()),
            subject: None,
            outcome: "hit".into(),
            request_id: None,
            detail: None,
            prev_hash: prev.into(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    #[test]
    fn each_hash_covers_the_previous_one_and_every_field() {
        let first = row(1, GENESIS_HASH);
        let second = row(2, &first.hash);
        assert_ne!(first.hash, second.hash);
        let mut changed = second.clone();
        changed.outcome = "miss".into();
        assert_ne!(changed.compute_hash(), second.hash);
        let mut rechained = second.clone();
        rechained.prev_hash = GENESIS_HASH.into();
        assert_ne!(rechained.compute_hash(), second.hash);
    }
}
