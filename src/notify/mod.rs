//! Notifications: the outbox rows written in the same transaction as the attendance or check they report, one per
//! responsible local authority; the per-channel delivery rows the `deliver` job works through; and what an email
//! or a webhook says. Nothing here sends: see `deliver`.

pub mod backoff;
pub mod deliver;
pub mod email;
pub mod webhook;

use crate::clock::format_timestamp;
use crate::config::SensitivePolicy;
use crate::db::models::PlanRow;
use crate::db::schema::{deliveries, delivery_attempts, delivery_endpoints, notifications};
use crate::db::stamp::Stamp;
use crate::db::{deferred, DbConnection};
use crate::domain::SettingType;
use chrono::{Duration, NaiveDateTime};
use diesel::prelude::*;
use diesel::result::Error;
use serde_json::{json, Value};
use std::collections::HashMap;

pub const ATTENDANCE_FLAGGED: &str = "attendance.flagged";
pub const FLAG_ACCESSED: &str = "flag.accessed";
pub const DELIVERY_EXHAUSTED: &str = "delivery.exhausted";
pub const PLAN_ENDING: &str = "plan.ending";
pub const EVENTS: [&str; 4] = [
    ATTENDANCE_FLAGGED,
    FLAG_ACCESSED,
    DELIVERY_EXHAUSTED,
    PLAN_ENDING,
];

pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const DEAD: &str = "dead";
pub const EMAIL: &str = "email";
pub const WEBHOOK: &str = "webhook";

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = notifications, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct NotificationRow {
    pub id: String,
    pub org_ods: String,
    pub event: String,
    pub status: String,
    pub review: bool,
    pub nhs_number: Option<String>,
    pub setting_ods: Option<String>,
    pub setting_type: Option<String>,
    pub attendance_ref: Option<String>,
    pub occurred_at: Stamp,
    /// The event as sent (webhook body); cleared when personal data is purged.
    pub payload: Option<String>,
    pub created_at: Stamp,
    pub updated_at: Stamp,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = deliveries, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct DeliveryRow {
    pub notification_id: String,
    pub channel: String,
    pub target: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Stamp,
    pub lease_until: Option<Stamp>,
    pub leased_by: Option<String>,
    pub last_error: Option<String>,
    pub delivered_at: Option<Stamp>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = delivery_attempts, treat_none_as_default_value = false)]
pub struct AttemptRow {
    pub id: String,
    pub notification_id: String,
    pub channel: String,
    pub at: Stamp,
    pub outcome: String,
    pub response_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

#[derive(Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = delivery_endpoints, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct EndpointRow {
    pub org_ods: String,
    /// Comma-separated addresses.
    pub emails: String,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub webhook_previous_secret: Option<String>,
    pub previous_secret_until: Option<Stamp>,
    pub webhook_disabled_at: Option<Stamp>,
    /// Comma-separated event names.
    pub events: String,
    pub updated_at: Stamp,
}

impl std::fmt::Debug for EndpointRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRow")
            .field("org_ods", &self.org_ods)
            .field("webhook_url", &self.webhook_url)
            .finish_non_exhaustive()
    }
}

impl EndpointRow {
    /// Inside a group-commit batch, an endpoint the batch has read already comes from the batch's memory
    /// ([`crate::db::deferred`]); writes to it below make the batch forget it.
    pub fn find(conn: &mut DbConnection, org: &str) -> Result<Option<Self>, Error> {
        if let Some(Some(known)) = deferred::with(|d| d.endpoints.get(org).cloned()) {
            return Ok(known);
        }
        let found = crate::on_backend!(conn, |c| delivery_endpoints::table
            .find(org)
            .select(Self::as_select())
            .first(c)
            .optional())?;
        deferred::with(|d| d.endpoints.insert(org.to_string(), found.clone()));
        Ok(found)
    }

    /// The batch, if one is running, reads `org`'s endpoint afresh after a write to it.
    fn forget(org: &str) {
        deferred::with(|d| d.endpoints.remove(org));
    }

    pub fn find_many(conn: &mut DbConnection, orgs: &[&str]) -> Result<Vec<Self>, Error> {
        crate::on_backend!(conn, |c| delivery_endpoints::table
            .filter(delivery_endpoints::org_ods.eq_any(orgs))
            .select(Self::as_select())
            .load(c))
    }

    pub fn wants(&self, event: &str) -> bool {
        self.events.split(',').any(|e| e == event)
    }

    pub fn email_targets(&self) -> Option<String> {
        (!self.emails.is_empty()).then(|| self.emails.clone())
    }

    /// The secrets to sign with now: the current one, and the previous one while a rotation is in progress.
    pub fn signing_secrets(&self, now: NaiveDateTime) -> Vec<String> {
        let mut s: Vec<String> = self.webhook_secret.iter().cloned().collect();
        if let (Some(prev), Some(until)) =
            (&self.webhook_previous_secret, self.previous_secret_until)
        {
            if until > now {
                s.push(prev.clone());
            }
        }
        s
    }

    pub fn upsert(conn: &mut DbConnection, row: &EndpointRow) -> Result<(), Error> {
        let existed = Self::find(conn, &row.org_ods)?.is_some();
        Self::forget(&row.org_ods);
        if existed {
            diesel::update(delivery_endpoints::table.find(&row.org_ods))
                .set(row)
                .execute(conn)?;
        } else {
            diesel::insert_into(delivery_endpoints::table)
                .values(row)
                .execute(conn)?;
        }
        Ok(())
    }

    pub fn disable_webhook(
        conn: &mut DbConnection,
        org: &str,
        now: NaiveDateTime,
    ) -> Result<(), Error> {
        Self::forget(org);
        diesel::update(delivery_endpoints::table.find(org))
            .set(delivery_endpoints::webhook_disabled_at.eq(Some(Stamp(now))))
            .execute(conn)
            .map(|_| ())
    }
}

impl NotificationRow {
    pub fn find(conn: &mut DbConnection, id: &str) -> Result<Option<Self>, Error> {
        crate::on_backend!(conn, |c| notifications::table
            .find(id)
            .select(Self::as_select())
            .first(c)
            .optional())
    }

    pub fn find_many(conn: &mut DbConnection, ids: &[&str]) -> Result<Vec<Self>, Error> {
        crate::on_backend!(conn, |c| notifications::table
            .filter(notifications::id.eq_any(ids))
            .select(Self::as_select())
            .load(c))
    }

    /// An earlier notification of the same visit: this authority, this setting, this person, within the window.
    fn same_visit(
        conn: &mut DbConnection,
        org: &str,
        setting: &str,
        nhs: &str,
        at: NaiveDateTime,
        window: Duration,
    ) -> Result<Option<String>, Error> {
        let (from, to) = (at - window, at + window);
        let buffered = crate::db::deferred::with(|d| {
            d.notifications
                .iter()
                .find(|n| {
                    n.org_ods == org
                        && n.setting_ods.as_deref() == Some(setting)
                        && n.nhs_number.as_deref() == Some(nhs)
                        && (n.event == ATTENDANCE_FLAGGED || n.event == FLAG_ACCESSED)
                        && (from..=to).contains(&n.occurred_at)
                })
                .map(|n| n.id.clone())
                .inspect(|id| {
                    d.reused.insert(id.clone());
                })
        });
        if let Some(Some(id)) = buffered {
            return Ok(Some(id));
        }
        crate::on_backend!(conn, |c| notifications::table
            .filter(notifications::org_ods.eq(org))
            .filter(notifications::setting_ods.eq(setting))
            .filter(notifications::nhs_number.eq(nhs))
            // Two equalities rather than `IN`, which diesel cannot keep prepared.
            .filter(
                notifications::event
                    .eq(ATTENDANCE_FLAGGED)
                    .or(notifications::event.eq(FLAG_ACCESSED)),
            )
            .filter(notifications::occurred_at.ge(Stamp(from)))
            .filter(notifications::occurred_at.le(Stamp(to)))
            .select(notifications::id)
            .first(c)
            .optional())
    }

    pub fn ids_for_attendance(
        conn: &mut DbConnection,
        attendance: &str,
    ) -> Result<Vec<String>, Error> {
        let mut ids: Vec<String> = notifications::table
            .filter(notifications::attendance_ref.eq(attendance))
            .order(notifications::created_at.asc())
            .select(notifications::id)
            .load(conn)?;
        crate::db::deferred::with(|d| {
            ids.extend(
                d.notifications
                    .iter()
                    .filter(|n| n.attendance_ref.as_deref() == Some(attendance))
                    .map(|n| n.id.clone()),
            )
        });
        Ok(ids)
    }

    pub fn deliveries(conn: &mut DbConnection, id: &str) -> Result<Vec<DeliveryRow>, Error> {
        deliveries::table
            .filter(deliveries::notification_id.eq(id))
            .order(deliveries::channel.asc())
            .select(DeliveryRow::as_select())
            .load(conn)
    }

    pub fn attempts(conn: &mut DbConnection, id: &str) -> Result<Vec<AttemptRow>, Error> {
        delivery_attempts::table
            .filter(delivery_attempts::notification_id.eq(id))
            .order(delivery_attempts::at.asc())
            .select(AttemptRow::as_select())
            .load(conn)
    }
}

impl DeliveryRow {
    /// A channel waiting for its first attempt.
    pub fn new(
        notification_id: &str,
        channel: &str,
        target: &str,
        first_attempt: NaiveDateTime,
    ) -> Self {
        DeliveryRow {
            notification_id: notification_id.to_string(),
            channel: channel.to_string(),
            target: target.to_string(),
            status: PENDING.into(),
            attempts: 0,
            next_attempt_at: first_attempt.into(),
            lease_until: None,
            leased_by: None,
            last_error: None,
            delivered_at: None,
        }
    }
}

/// The state of a notification from the states of its channels: dead when any channel is dead (those that
/// delivered stay recorded), delivered when every channel has delivered, otherwise pending (including when the
/// authority has no channel configured yet).
pub fn overall_status(channels: &[&str]) -> &'static str {
    if channels.contains(&DEAD) {
        DEAD
    } else if !channels.is_empty() && channels.iter().all(|c| *c == DELIVERED) {
        DELIVERED
    } else {
        PENDING
    }
}

/// Recomputes and stores a notification's status; answers it.
pub fn refresh_status(
    conn: &mut DbConnection,
    id: &str,
    now: NaiveDateTime,
) -> Result<&'static str, Error> {
    Ok(refresh_statuses(conn, &[id], now)?
        .remove(id)
        .unwrap_or(PENDING))
}

/// Recomputes and stores these notifications' statuses (one query for their channels, one update per status);
/// answers them.
pub fn refresh_statuses(
    conn: &mut DbConnection,
    ids: &[&str],
    now: NaiveDateTime,
) -> Result<HashMap<String, &'static str>, Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String)> = crate::on_backend!(conn, |c| deliveries::table
        .filter(deliveries::notification_id.eq_any(ids))
        .select((deliveries::notification_id, deliveries::status))
        .load(c))?;
    let mut channels: HashMap<&str, Vec<&str>> = ids.iter().map(|id| (*id, Vec::new())).collect();
    for (id, status) in &rows {
        if let Some(states) = channels.get_mut(id.as_str()) {
            states.push(status.as_str());
        }
    }
    let mut overall: HashMap<String, &'static str> = HashMap::with_capacity(channels.len());
    let mut by_status: HashMap<&'static str, Vec<&str>> = HashMap::new();
    for (id, states) in channels {
        let status = overall_status(&states);
        overall.insert(id.to_string(), status);
        by_status.entry(status).or_default().push(id);
    }
    for (status, these) in by_status {
        crate::on_backend!(conn, |c| diesel::update(
            notifications::table.filter(notifications::id.eq_any(&these))
        )
        .set((
            notifications::status.eq(status),
            notifications::updated_at.eq(Stamp(now)),
        ))
        .execute(c))?;
    }
    Ok(overall)
}

/// Writes a new notification and its delivery rows; inside the group-commit writer they join the batch's
/// multi-row inserts ([`crate::db::deferred`]).
fn insert_notification(
    conn: &mut DbConnection,
    row: NotificationRow,
    endpoint: Option<&EndpointRow>,
    first_attempt: NaiveDateTime,
) -> Result<(), Error> {
    let deliveries = channels(&row, endpoint, first_attempt);
    match crate::db::deferred::keep(row, |d| &mut d.notifications) {
        None => {
            crate::db::deferred::with(|d| d.deliveries.extend(deliveries));
        }
        // No batch to join: at once.
        Some(row) => {
            crate::db::insert_notifications(conn, std::slice::from_ref(&row))?;
            crate::db::insert_deliveries(conn, &deliveries)?;
        }
    }
    Ok(())
}

/// The delivery rows of a notification: whatever channels its authority has for its event.
fn channels(
    n: &NotificationRow,
    endpoint: Option<&EndpointRow>,
    first_attempt: NaiveDateTime,
) -> Vec<DeliveryRow> {
    let Some(ep) = endpoint.filter(|e| e.wants(&n.event)) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    if let Some(emails) = ep.email_targets() {
        rows.push(DeliveryRow::new(&n.id, EMAIL, &emails, first_attempt));
    }
    if let (Some(url), None) = (&ep.webhook_url, ep.webhook_disabled_at) {
        rows.push(DeliveryRow::new(&n.id, WEBHOOK, url, first_attempt));
    }
    rows
}

/// Makes the delivery rows of a notification for whatever channels its authority has for its event.
pub fn add_channels(
    conn: &mut DbConnection,
    n: &NotificationRow,
    endpoint: Option<&EndpointRow>,
    first_attempt: NaiveDateTime,
) -> Result<usize, Error> {
    let rows = channels(n, endpoint, first_attempt);
    crate::db::insert_deliveries(conn, &rows)
}

/// What happened, to be told to the responsible authorities.
#[derive(Debug, Clone)]
pub struct Occurrence<'a> {
    pub event: &'static str,
    pub nhs_number: &'a str,
    pub initials: Option<String>,
    pub setting_ods: &'a str,
    pub setting_name: Option<&'a str>,
    pub setting_type: Option<SettingType>,
    pub occurred_at: NaiveDateTime,
    pub attendance_ref: Option<&'a str>,
    /// A possible (not certain) match: the authority should review before acting.
    pub review: bool,
    pub match_method: &'a str,
}

/// The document a notification carries: stored with it, signed and sent as the webhook's body, and read back for
/// its email. Built in one pass from borrowed fields, without a `serde_json::Value` tree (the writer builds one
/// for every flag check that hits and every flagged attendance). The fields are declared in alphabetical order,
/// the order in which a `json!` object writes its keys, so the document is byte for byte what it was when it
/// was built that way (tested).
#[derive(serde::Serialize)]
struct Payload<'a> {
    data: PayloadData<'a>,
    timestamp: String,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(serde::Serialize)]
struct PayloadData<'a> {
    child: PayloadChild<'a>,
    event: &'a str,
    link: &'a str,
    #[serde(rename = "match")]
    matched: PayloadMatch<'a>,
    notification_id: &'a str,
    occurred_at: String,
    plans: Vec<PayloadPlan<'a>>,
    review: bool,
    setting: PayloadSetting<'a>,
}

#[derive(serde::Serialize)]
struct PayloadChild<'a> {
    initials: Option<&'a str>,
    nhs_number: &'a str,
}

#[derive(serde::Serialize)]
struct PayloadMatch<'a> {
    method: &'a str,
    review: bool,
}

#[derive(serde::Serialize)]
struct PayloadPlan<'a> {
    local_reference: &'a str,
    plan_id: &'a str,
    plan_type: &'a str,
}

#[derive(serde::Serialize)]
struct PayloadSetting<'a> {
    name: Option<&'a str>,
    ods_code: Option<&'a str>,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
}

/// Where an authority reads notification `id` in the API.
fn link(public_base_url: &str, id: &str) -> String {
    format!(
        "{}/v1/notifications/{id}",
        public_base_url.trim_end_matches('/')
    )
}

/// The document of notification `id` to authority `la` about `occ`, naming `la`'s plans among `plans`.
fn payload(
    occ: &Occurrence,
    id: &str,
    now: NaiveDateTime,
    withhold_setting: bool,
    la: &str,
    plans: &[PlanRow],
    link: &str,
) -> String {
    let document = Payload {
        data: PayloadData {
            child: PayloadChild {
                initials: occ.initials.as_deref(),
                nhs_number: occ.nhs_number,
            },
            event: occ.event,
            link,
            matched: PayloadMatch {
                method: occ.match_method,
                review: occ.review,
            },
            notification_id: id,
            occurred_at: format_timestamp(occ.occurred_at),
            plans: plans
                .iter()
                .filter(|p| p.la_ods == la)
                .map(|p| PayloadPlan {
                    local_reference: &p.local_reference,
                    plan_id: &p.id,
                    plan_type: &p.plan_type,
                })
                .collect(),
            review: occ.review,
            setting: PayloadSetting {
                name: occ.setting_name.filter(|_| !withhold_setting),
                ods_code: Some(occ.setting_ods).filter(|_| !withhold_setting),
                kind: occ.setting_type.map(|t| t.as_str()),
            },
        },
        timestamp: format_timestamp(now),
        kind: occ.event,
    };
    // Strings, booleans and options of them: nothing here can fail to serialise.
    serde_json::to_string(&document).expect("a notification document serialises")
}

/// Writes the outbox rows for an occurrence: one notification per responsible authority of `plans` (active,
/// applicable plans), unless the same visit was already notified within the window, or the setting is sensitive
/// and policy says not to. Answers the ids of the notifications that now cover this occurrence.
pub fn enqueue(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    config: &crate::config::Settings,
    plans: &[PlanRow],
    occ: &Occurrence,
) -> Result<Vec<String>, Error> {
    let (settings, public_base_url) = (&config.delivery, config.server.public_base_url.as_str());
    let sensitive = occ.setting_type.is_some_and(SettingType::is_sensitive);
    if sensitive && settings.sensitive_settings == SensitivePolicy::DoNotNotify {
        return Ok(Vec::new());
    }
    let withhold_setting =
        sensitive && settings.sensitive_settings == SensitivePolicy::NotifyWithoutSettingName;
    let mut authorities: Vec<&str> = plans.iter().map(|p| p.la_ods.as_str()).collect();
    authorities.sort();
    authorities.dedup();
    let window = Duration::hours(settings.visit_window_hours);
    let first_attempt = now;
    let mut ids = Vec::new();
    for la in authorities {
        if let Some(existing) = NotificationRow::same_visit(
            conn,
            la,
            occ.setting_ods,
            occ.nhs_number,
            occ.occurred_at,
            window,
        )? {
            ids.push(existing);
            continue;
        }
        let id = crate::db::new_id();
        let link = link(public_base_url, &id);
        let payload = payload(occ, &id, now, withhold_setting, la, plans, &link);
        let row = NotificationRow {
            id: id.clone(),
            org_ods: la.to_string(),
            event: occ.event.to_string(),
            status: PENDING.into(),
            review: occ.review,
            nhs_number: Some(occ.nhs_number.to_string()),
            setting_ods: Some(occ.setting_ods.to_string()),
            setting_type: occ.setting_type.map(|t| t.as_str().to_string()),
            attendance_ref: occ.attendance_ref.map(str::to_string),
            occurred_at: occ.occurred_at.into(),
            payload: Some(payload),
            created_at: now.into(),
            updated_at: now.into(),
        };
        let endpoint = EndpointRow::find(conn, la)?;
        insert_notification(conn, row, endpoint.as_ref(), first_attempt)?;
        ids.push(id);
    }
    Ok(ids)
}

/// Writes a `delivery.exhausted` notification to the fallback address about a dead one.
pub fn enqueue_exhausted(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    dead: &NotificationRow,
    fallback: &str,
    public_base_url: &str,
) -> Result<String, Error> {
    let id = crate::db::new_id();
    let payload = json!({
        "type": DELIVERY_EXHAUSTED,
        "timestamp": format_timestamp(now),
        "data": {
            "notification_id": id,
            "event": DELIVERY_EXHAUSTED,
            "undelivered": {"notification_id": dead.id, "event": dead.event, "org_ods": dead.org_ods,
                            "occurred_at": format_timestamp(dead.occurred_at)},
            "link": link(public_base_url, &dead.id),
        }
    });
    let row = NotificationRow {
        id: id.clone(),
        org_ods: dead.org_ods.clone(),
        event: DELIVERY_EXHAUSTED.into(),
        status: PENDING.into(),
        review: false,
        nhs_number: None,
        setting_ods: None,
        setting_type: None,
        attendance_ref: None,
        occurred_at: now.into(),
        payload: Some(payload.to_string()),
        created_at: now.into(),
        updated_at: now.into(),
    };
    diesel::insert_into(notifications::table)
        .values(&row)
        .execute(conn)?;
    diesel::insert_into(deliveries::table)
        .values(DeliveryRow::new(&id, EMAIL, fallback, now))
        .execute(conn)?;
    Ok(id)
}

fn human_event(event: &str) -> &'static str {
    match event {
        ATTENDANCE_FLAGGED => {
            "A child subject to a protection plan held by your authority attended unscheduled care"
        }
        FLAG_ACCESSED => {
            "The protection flag of a child on one of your plans was viewed in unscheduled care"
        }
        DELIVERY_EXHAUSTED => "A cpis notification could not be delivered",
        _ => "cpis notification",
    }
}

/// The email for a notification: a subject that identifies no one; the minimum necessary in the body.
pub fn compose_email(
    n: &NotificationRow,
    include_identifiers: bool,
    domain: &str,
) -> email::OutgoingEmail {
    let payload: Value = n
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or(Value::Null);
    let d = &payload["data"];
    let reference = &n.id[..8];
    let subject = match n.event.as_str() {
        DELIVERY_EXHAUSTED => {
            format!("cpis: notification could not be delivered (ref {reference})")
        }
        _ => format!("cpis safeguarding notification (ref {reference})"),
    };
    let mut body = String::new();
    body.push_str(human_event(&n.event));
    body.push_str(".\n\n");
    let line = |body: &mut String, label: &str, value: &Value| {
        if let Some(v) = value.as_str().filter(|v| !v.is_empty()) {
            body.push_str(&format!("{label}: {v}\n"));
        }
    };
    line(&mut body, "Event", &json!(n.event));
    if d["review"] == true {
        body.push_str("Match: POSSIBLE - please review before acting\n");
    }
    line(&mut body, "Setting", &d["setting"]["name"]);
    line(&mut body, "Setting type", &d["setting"]["type"]);
    line(&mut body, "Time", &d["occurred_at"]);
    let plan_types: Vec<&str> = d["plans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["plan_type"].as_str())
        .collect();
    if !plan_types.is_empty() {
        body.push_str(&format!("Plan type: {}\n", plan_types.join(", ")));
    }
    let references: Vec<&str> = d["plans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["local_reference"].as_str())
        .collect();
    if !references.is_empty() {
        body.push_str(&format!("Your reference: {}\n", references.join(", ")));
    }
    line(&mut body, "Child's initials", &d["child"]["initials"]);
    if include_identifiers {
        line(&mut body, "NHS number", &d["child"]["nhs_number"]);
    }
    if let Some(u) = d["undelivered"].as_object() {
        body.push_str(&format!(
            "Undelivered notification: {} ({}) for {}\n",
            u.get("notification_id")
                .and_then(Value::as_str)
                .unwrap_or(""),
            u.get("event").and_then(Value::as_str).unwrap_or(""),
            u.get("org_ods").and_then(Value::as_str).unwrap_or("")
        ));
    }
    body.push_str(&format!("Reference: {}\n", n.id));
    line(&mut body, "Details", &d["link"]);
    body.push_str(
        "\nSign in to cpis with your organisation's key to read the full notification.\n",
    );
    email::OutgoingEmail {
        to: Vec::new(),
        subject,
        body,
        message_id: format!("{}@{domain}", n.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(org: &str, url: &str) -> EndpointRow {
        EndpointRow {
            org_ods: org.into(),
            emails: "mash@example.org".into(),
            webhook_url: Some(url.into()),
            webhook_secret: Some("secret".into()),
            webhook_previous_secret: None,
            previous_secret_until: None,
            webhook_disabled_at: None,
            events: FLAG_ACCESSED.into(),
            updated_at: chrono::NaiveDateTime::default().into(),
        }
    }

    #[test]
    fn a_notification_document_is_byte_for_byte_what_a_json_object_made() {
        let at = |h| {
            chrono::NaiveDate::from_ymd_opt(2026, 11, 27)
                .unwrap()
                .and_hms_opt(h, 5, 9)
                .unwrap()
        };
        let plan = |id: &str, la: &str, reference: &str, kind: &str| PlanRow {
            id: id.into(),
            la_ods: la.into(),
            local_reference: reference.into(),
            ..PlanRow::sample(kind, at(0).date())
        };
        // Two plans of the authority told (one reference in need of escaping) and one of another authority.
        let plans = [
            plan("p1", "E08000025", "CP/\"7\"\u{e9}\n", "CPP"),
            plan("p2", "E09000001", "LAC-1", "LAC"),
            plan("p3", "E08000025", "UCPP-2", "UCPP"),
        ];
        let link = "https://cpis.example/v1/notifications/n1";
        // What `enqueue` built before the typed document, kept here as the reference.
        let reference = |occ: &Occurrence, withhold_setting: bool| {
            let their_plans: Vec<&PlanRow> =
                plans.iter().filter(|p| p.la_ods == "E08000025").collect();
            json!({
                "type": occ.event,
                "timestamp": format_timestamp(at(12)),
                "data": {
                    "notification_id": "n1",
                    "event": occ.event,
                    "occurred_at": format_timestamp(occ.occurred_at),
                    "review": occ.review,
                    "setting": {
                        "ods_code": if withhold_setting { None } else { Some(occ.setting_ods) },
                        "name": if withhold_setting { None } else { occ.setting_name },
                        "type": occ.setting_type.map(|t| t.as_str()),
                    },
                    "child": {"nhs_number": occ.nhs_number, "initials": occ.initials},
                    "plans": their_plans.iter().map(|p| json!({"plan_id": p.id, "plan_type": p.plan_type, "local_reference": p.local_reference})).collect::<Vec<_>>(),
                    "match": {"method": occ.match_method, "review": occ.review},
                    "link": link,
                }
            })
            .to_string()
        };
        let seen = Occurrence {
            event: FLAG_ACCESSED,
            nhs_number: "9434765919",
            initials: Some("J.S.".into()),
            setting_ods: "RXK01",
            setting_name: Some("Sandwell \"General\" Hospital"),
            setting_type: Some(SettingType::Ed),
            occurred_at: at(11),
            attendance_ref: None,
            review: false,
            match_method: "nhs_number",
        };
        let possible = Occurrence {
            event: ATTENDANCE_FLAGGED,
            initials: None,
            setting_type: None,
            attendance_ref: Some("a1"),
            review: true,
            match_method: "demographics",
            ..seen
        };
        for (occ, withhold) in [(&seen, false), (&seen, true), (&possible, false)] {
            let typed = payload(occ, "n1", at(12), withhold, "E08000025", &plans, link);
            assert_eq!(typed, reference(occ, withhold));
        }
        // And it reads back as the document a receiver expects.
        let doc: Value = serde_json::from_str(&payload(
            &seen,
            "n1",
            at(12),
            false,
            "E08000025",
            &plans,
            link,
        ))
        .unwrap();
        assert_eq!(doc["data"]["plans"].as_array().unwrap().len(), 2);
        assert_eq!(
            doc["data"]["plans"][0]["local_reference"],
            "CP/\"7\"\u{e9}\n"
        );
        assert_eq!(
            doc["data"]["setting"]["name"],
            "Sandwell \"General\" Hospital"
        );
        assert_eq!(doc["data"]["match"]["method"], "nhs_number");
    }

    #[test]
    fn a_batch_reads_an_endpoint_once_and_sees_its_own_writes_but_not_a_failed_writes() {
        use diesel::Connection;
        let mut conn = crate::db::tests::memory_sqlite();
        let url = |conn: &mut DbConnection| {
            EndpointRow::find(conn, "E08000025")
                .unwrap()
                .and_then(|e| e.webhook_disabled_at.is_none().then_some(e.webhook_url)?)
        };
        let la = crate::db::models::Organisation {
            ods_code: "E08000025".into(),
            name: "Birmingham City Council".into(),
            kind: "local_authority".into(),
            region: None,
            office_phone: None,
            emergency_duty_phone: None,
            email: None,
            created_at: chrono::NaiveDateTime::default().into(),
            updated_at: chrono::NaiveDateTime::default().into(),
        };
        crate::db::models::Organisation::upsert(&mut conn, &la).unwrap();
        EndpointRow::upsert(&mut conn, &endpoint("E08000025", "https://a.example")).unwrap();
        deferred::begin();
        assert_eq!(url(&mut conn).as_deref(), Some("https://a.example"));
        // Changed behind the batch's back (no writer does this): the batch answers from what it read.
        diesel::update(delivery_endpoints::table)
            .set(delivery_endpoints::webhook_url.eq("https://behind.example"))
            .execute(&mut conn)
            .unwrap();
        assert_eq!(url(&mut conn).as_deref(), Some("https://a.example"));
        // A write in the batch is seen by the writes after it.
        EndpointRow::upsert(&mut conn, &endpoint("E08000025", "https://b.example")).unwrap();
        assert_eq!(url(&mut conn).as_deref(), Some("https://b.example"));
        EndpointRow::disable_webhook(&mut conn, "E08000025", chrono::NaiveDateTime::default())
            .unwrap();
        assert_eq!(url(&mut conn), None);
        // A write that fails is rolled back to its savepoint, and the batch forgets what it had read.
        let mark = deferred::mark();
        let failed = conn.transaction(|c| {
            EndpointRow::upsert(c, &endpoint("E08000025", "https://c.example"))?;
            assert_eq!(url(c).as_deref(), Some("https://c.example"));
            Err::<(), _>(Error::RollbackTransaction)
        });
        assert!(failed.is_err());
        deferred::truncate(mark);
        assert_eq!(
            url(&mut conn),
            None,
            "the disabled webhook, as committed before the failed write"
        );
        deferred::abandon();
    }

    #[test]
    fn a_notification_is_dead_if_any_channel_is_and_delivered_only_when_all_are() {
        assert_eq!(overall_status(&[]), PENDING);
        assert_eq!(overall_status(&[DELIVERED, PENDING]), PENDING);
        assert_eq!(overall_status(&[DELIVERED, DELIVERED]), DELIVERED);
        assert_eq!(overall_status(&[DELIVERED, DEAD]), DEAD);
    }

    fn row(payload: Value) -> NotificationRow {
        let at = chrono::NaiveDate::from_ymd_opt(2026, 11, 20)
            .unwrap()
            .and_hms_opt(22, 15, 0)
            .unwrap();
        NotificationRow {
            id: "0b7c6c1e-1111-2222-3333-444455556666".into(),
            org_ods: "E08000025".into(),
            event: ATTENDANCE_FLAGGED.into(),
            status: PENDING.into(),
            review: false,
            nhs_number: Some("9434765919".into()),
            setting_ods: Some("RBT01".into()),
            setting_type: Some("ED".into()),
            attendance_ref: None,
            occurred_at: at.into(),
            payload: Some(payload.to_string()),
            created_at: at.into(),
            updated_at: at.into(),
        }
    }

    #[test]
    fn an_email_subject_identifies_no_one_and_the_body_carries_the_minimum() {
        let n = row(json!({"data": {
            "occurred_at": "2026-11-20T22:15:00.000000Z", "review": false,
            "setting": {"ods_code": "RBT01", "name": "Warrington ED", "type": "ED"},
            "child": {"nhs_number": "9434765919", "initials": "A.S."},
            "plans": [{"plan_type": "CPP", "local_reference": "BCC-1"}],
            "link": "https://cpis.example/v1/notifications/0b7c"}}));
        let with = compose_email(&n, true, "cpis.example");
        assert!(!with.subject.contains("9434765919") && !with.subject.contains("A.S."));
        for part in [
            "Warrington ED",
            "ED",
            "2026-11-20T22:15",
            "CPP",
            "A.S.",
            "9434765919",
            "https://cpis.example/v1/notifications/0b7c",
            &n.id,
        ] {
            assert!(
                with.body.contains(part),
                "{part} missing from {}",
                with.body
            );
        }
        assert_eq!(with.message_id, format!("{}@cpis.example", n.id));
        let without = compose_email(&n, false, "cpis.example");
        assert!(!without.body.contains("9434765919"));
    }
}
