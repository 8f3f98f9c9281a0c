//! Bulk plan files: CSV, one plan per row, header row with the field names of `POST /v1/plans` (the child's
//! demographics as `given_name, family_name, birth_date, sex, postcode`). Every row is accepted or rejected on its
//! own with the national CP-IS codes (row `CPR06` accepted, `CPR07` rejected with every reason); the file gets
//! `CPF02` all accepted, `CPF03` some, `CPF04` none, or `CPF01` when it is corrupt (not CSV, wrong header, not
//! UTF-8, too long), in which case nothing changes. The file is read as a stream in one transaction, so a
//! re-sent file is a no-op and a corrupt one leaves no trace. `CPR05` (NHS number superseded) and `CPR01` (no
//! person match where a trace was required) need a national trace service, which cpis does not call.

use crate::audit::Actor;
use crate::db::DbConnection;
use crate::error::ApiError;
use crate::plans::{self, ChildBody, PlanBody, PlanInput, Registered};
use chrono::{NaiveDate, NaiveDateTime};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Read;

pub const MAX_ROWS: usize = 100_000;
pub const MAX_BYTES: usize = 50 * 1024 * 1024;

const REQUIRED: [&str; 4] = ["local_reference", "nhs_number", "plan_type", "start_date"];
const OPTIONAL: [&str; 8] = [
    "end_date",
    "delete_date",
    "expected_delivery_date",
    "given_name",
    "family_name",
    "birth_date",
    "sex",
    "postcode",
];

#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    /// 1 for the first row after the header.
    pub row: usize,
    pub local_reference: Option<String>,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileResult {
    pub file_code: &'static str,
    pub accepted: usize,
    pub rejected: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub rows: Vec<RowResult>,
}

impl FileResult {
    pub fn corrupt(detail: impl Into<String>) -> Self {
        FileResult {
            file_code: "CPF01",
            accepted: 0,
            rejected: 0,
            detail: Some(detail.into()),
            rows: Vec::new(),
        }
    }
}

/// Why an import stopped: the file is corrupt (roll back, answer CPF01), or the database failed (roll back, and
/// answer as any request the database failed: 503 when it could not be reached or ended the transaction to settle
/// a conflict, else 500). A database failure is never reported as a corrupt file.
#[derive(Debug)]
pub enum ImportError {
    Corrupt(String),
    Db(ApiError),
}

impl From<diesel::result::Error> for ImportError {
    fn from(e: diesel::result::Error) -> Self {
        ImportError::Db(ApiError::from(e))
    }
}

impl From<crate::db::DbError> for ImportError {
    fn from(e: crate::db::DbError) -> Self {
        ImportError::Db(ApiError::from(e))
    }
}

fn reasons(e: ApiError) -> Vec<String> {
    match e {
        ApiError::Validation(errors) => errors
            .into_iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect(),
        other => vec![other.detail()],
    }
}

/// Accepted rows are registered this many at a time.
const CHUNK: usize = 1000;

fn flush(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    actor: &Actor,
    la: &str,
    accepted: Vec<(usize, PlanInput)>,
    result: &mut FileResult,
) -> Result<(), ImportError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let (rows, inputs): (Vec<usize>, Vec<PlanInput>) = accepted.into_iter().unzip();
    let registered = plans::register_many(conn, now, actor, la, &inputs).map_err(|e| match e {
        e @ (ApiError::Internal(_) | ApiError::Unavailable(_)) => ImportError::Db(e),
        other => ImportError::Corrupt(other.detail()),
    })?;
    result.rows.reserve(rows.len());
    for ((row, input), (plan, outcome)) in rows.into_iter().zip(inputs).zip(registered) {
        result.accepted += 1;
        result.rows.push(RowResult {
            row,
            local_reference: Some(input.local_reference),
            code: "CPR06",
            reasons: Vec::new(),
            plan_id: Some(plan.id),
            outcome: Some(match outcome {
                Registered::Created => "created",
                Registered::Updated => "updated",
                Registered::Unchanged => "unchanged",
            }),
        });
    }
    Ok(())
}

/// Rows read and checked, sent from the reading thread to the one that registers them.
struct Parsed {
    accepted: Vec<(usize, PlanInput)>,
    rejected: Vec<RowResult>,
}

/// Imports a file for authority `la` inside the caller's transaction; `progress` is told each row number.
///
/// Two threads share the work: one reads and checks the rows (CSV, UTF-8, every field's rules) and hands over a
/// chunk of accepted rows at a time, while this one registers the chunk before it. The database work is most
/// of an import, and until the file is read this keeps the second core busy with the rest (BENCHMARKS.md,
/// change 45). At most two chunks wait between them. A corrupt file stops both, and the caller rolls back.
pub fn import(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    today: NaiveDate,
    actor: &Actor,
    la: &str,
    input: impl Read + Send,
    progress: impl FnMut(usize) + Send,
) -> Result<FileResult, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header = reader
        .byte_headers()
        .map_err(|e| ImportError::Corrupt(format!("the header row cannot be read: {e}")))?
        .clone();
    let mut columns: Vec<(&'static str, usize)> = Vec::new();
    for (i, raw) in header.iter().enumerate() {
        let name = std::str::from_utf8(raw)
            .map_err(|_| ImportError::Corrupt("the header row is not UTF-8".into()))?;
        let name = name
            .trim_start_matches('\u{feff}')
            .trim()
            .to_ascii_lowercase();
        let Some(known) = REQUIRED.iter().chain(&OPTIONAL).find(|c| **c == name) else {
            return Err(ImportError::Corrupt(format!(
                "unknown column `{name}`; columns are {} (required) and {}",
                REQUIRED.join(", "),
                OPTIONAL.join(", ")
            )));
        };
        if columns.iter().any(|(c, _)| c == known) {
            return Err(ImportError::Corrupt(format!(
                "column `{name}` appears twice"
            )));
        }
        columns.push((known, i));
    }
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !columns.iter().any(|(name, _)| name == c))
        .collect();
    if !missing.is_empty() {
        return Err(ImportError::Corrupt(format!(
            "the header row lacks {}",
            missing.join(", ")
        )));
    }

    let mut result = FileResult {
        file_code: "CPF04",
        accepted: 0,
        rejected: 0,
        detail: None,
        rows: Vec::new(),
    };
    let rows = std::thread::scope(|scope| {
        let (sender, chunks) = std::sync::mpsc::sync_channel::<Parsed>(2);
        let reading = std::thread::Builder::new()
            .name("cpis-bulk-read".into())
            .spawn_scoped(scope, move || {
                read_rows(reader, header.len(), &columns, today, progress, sender)
            })
            .map_err(|e| ImportError::Corrupt(format!("the file could not be read: {e}")))?;
        let registered = chunks.iter().try_for_each(|chunk| {
            result.rejected += chunk.rejected.len();
            result.rows.extend(chunk.rejected);
            flush(conn, now, actor, la, chunk.accepted, &mut result)
        });
        // After a database error this stops the reader at its next chunk.
        drop(chunks);
        let read = reading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        registered?;
        read
    })?;
    result.rows.sort_by_key(|r| r.row);
    if rows == 0 {
        return Err(ImportError::Corrupt(
            "the file has a header but no rows".into(),
        ));
    }
    result.file_code = match (result.accepted, result.rejected) {
        (_, 0) => "CPF02",
        (0, _) => "CPF04",
        _ => "CPF03",
    };
    Ok(result)
}

/// Reads and checks every row after the header, sending them on in chunks of [`CHUNK`] accepted rows; returns
/// how many rows there were. Stops early, with `Ok`, when the registering side has gone.
fn read_rows(
    mut reader: csv::Reader<impl Read>,
    fields_in_header: usize,
    columns: &[(&'static str, usize)],
    today: NaiveDate,
    mut progress: impl FnMut(usize),
    sender: std::sync::mpsc::SyncSender<Parsed>,
) -> Result<usize, ImportError> {
    let fresh = || Parsed {
        accepted: Vec::with_capacity(CHUNK),
        rejected: Vec::new(),
    };
    let mut parsed = fresh();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut record = csv::ByteRecord::new();
    let mut row = 0;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                return Err(ImportError::Corrupt(format!(
                    "row {}: not CSV: {e}",
                    row + 1
                )))
            }
        }
        row += 1;
        if row > MAX_ROWS {
            return Err(ImportError::Corrupt(format!(
                "more than {MAX_ROWS} rows; split the file"
            )));
        }
        progress(row);
        let mut fields: Vec<(&'static str, String)> = Vec::with_capacity(columns.len());
        for &(name, i) in columns {
            if let Some(raw) = record.get(i) {
                let text = std::str::from_utf8(raw)
                    .map_err(|_| ImportError::Corrupt(format!("row {row} is not UTF-8")))?;
                if !text.is_empty() {
                    fields.push((name, text.to_string()));
                }
            }
        }
        let mut take = |name: &str| {
            let at = fields.iter().position(|(n, _)| *n == name)?;
            Some(fields.swap_remove(at).1)
        };
        let reference = take("local_reference");
        let mut rejected = |reasons: Vec<String>| {
            parsed.rejected.push(RowResult {
                row,
                local_reference: reference.clone(),
                code: "CPR07",
                reasons,
                plan_id: None,
                outcome: None,
            })
        };
        if record.len() != fields_in_header {
            rejected(vec![format!(
                "has {} fields; the header has {fields_in_header}",
                record.len(),
            )]);
            continue;
        }
        if let Some(r) = &reference {
            if let Some(first) = seen.get(r) {
                rejected(vec![format!(
                    "local_reference: appears already in row {first} of this file"
                )]);
                continue;
            }
            seen.insert(r.clone(), row);
        }
        let child = ChildBody {
            given_name: take("given_name"),
            family_name: take("family_name"),
            birth_date: take("birth_date"),
            sex: take("sex"),
            postcode: take("postcode"),
        };
        let has_child = child.given_name.is_some()
            || child.family_name.is_some()
            || child.birth_date.is_some()
            || child.sex.is_some()
            || child.postcode.is_some();
        let body = PlanBody {
            local_reference: reference.clone(),
            nhs_number: take("nhs_number"),
            plan_type: take("plan_type"),
            start_date: take("start_date"),
            end_date: take("end_date"),
            delete_date: take("delete_date"),
            expected_delivery_date: take("expected_delivery_date"),
            child: has_child.then_some(child),
            contacts: None,
        };
        match PlanInput::parse(body, today) {
            Err(e) => rejected(reasons(e)),
            Ok(input) => {
                parsed.accepted.push((row, input));
                if parsed.accepted.len() == CHUNK
                    && sender
                        .send(std::mem::replace(&mut parsed, fresh()))
                        .is_err()
                {
                    return Ok(row);
                }
            }
        }
    }
    // The registering side may have gone already; it then has its own error to give.
    let _ = sender.send(parsed);
    Ok(row)
}

/// Runs an import in one write transaction: a corrupt file rolls back and answers CPF01.
pub fn import_file(
    db: &crate::db::Db,
    now: NaiveDateTime,
    today: NaiveDate,
    actor: &Actor,
    la: &str,
    input: impl Read + Send,
    progress: impl FnMut(usize) + Send,
) -> Result<FileResult, ApiError> {
    match db.write_blocking(|conn| import(conn, now, today, actor, la, input, progress)) {
        Ok(r) => Ok(r),
        Err(ImportError::Corrupt(detail)) => Ok(FileResult::corrupt(detail)),
        Err(ImportError::Db(e)) => Err(e),
    }
}
