//! The `cpis` command line: serve, migrate, and the operator commands for organisations, keys and the audit
//! trail. Each command is a library function so tests can call it.

use crate::audit::{self, Actor};
use crate::clock::{format_timestamp, Clock, SystemClock};
use crate::config::Settings;
use crate::db::models::ApiKeyRow;
use crate::db::Db;
use crate::domain::OdsCode;
use crate::error::{ApiError, Validator};
use crate::startup::{AppState, Application};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "cpis",
    version,
    about = "Child protection information sharing service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (and, later, its scheduled jobs).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage organisations.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Audit trail tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Scheduled jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Protection plans.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Load a small synthetic data set and print keys and curl commands to try every endpoint.
    Demo,
}

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Import a CSV file of plans for a local authority (the same format as POST /v1/plans/bulk).
    Import {
        file: std::path::PathBuf,
        #[arg(long)]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Run one tick of a job now.
    Run {
        #[arg(value_enum)]
        name: JobName,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum JobName {
    /// Deliver every due notification.
    Deliver,
    /// Record the plans whose end date has passed.
    Expire,
    /// Delete personal data past its delete date.
    Purge,
    /// Match again the attendances whose MPI lookup failed.
    Rematch,
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Create or update an organisation.
    Add {
        #[arg(long)]
        ods: String,
        #[arg(long)]
        name: String,
        /// local_authority, care_setting, mpi_source or other
        #[arg(long)]
        kind: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        office_phone: Option<String>,
        #[arg(long)]
        emergency_duty_phone: Option<String>,
        #[arg(long)]
        email: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; the key itself is printed once, alone on the last line.
    Create {
        #[arg(long)]
        org: String,
        /// care_setting, social_care, mpi_feed, auditor or admin (repeat for several)
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Revoke a key by its id.
    Revoke { id: String },
    /// List keys (ids, organisations, roles; never the keys).
    List,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain; exits non-zero when it is broken.
    Verify,
}

fn api_error(e: ApiError) -> anyhow::Error {
    match e {
        ApiError::Validation(errors) => anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        ApiError::Internal(cause) => cause,
        other => anyhow::anyhow!("{}", other.detail()),
    }
}

fn open_db(settings: &Settings) -> anyhow::Result<Db> {
    let db = Db::connect(&settings.database).context("opening the database")?;
    db.migrate().context("running migrations")?;
    Ok(db)
}

pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => Application::build(settings)?.run_until_stopped().await?,
        Command::Jobs(JobsCommand::Run { name }) => {
            let state = AppState::new(settings, Arc::new(SystemClock))?;
            let name = match name {
                JobName::Deliver => "deliver",
                JobName::Expire => "expire",
                JobName::Purge => "purge",
                JobName::Rematch => "rematch",
            };
            println!("{}", crate::jobs::run_now(&state, name).await?);
        }
        other => tokio::task::spawn_blocking(move || run_blocking(other, settings)).await??,
    }
    Ok(())
}

fn run_blocking(command: Command, settings: Settings) -> anyhow::Result<()> {
    let clock = SystemClock;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Serve | Command::Jobs(_) => unreachable!("runs on the async runtime"),
        Command::Migrate => {
            let db = Db::connect(&settings.database)?;
            let applied = db.migrate()?;
            writeln!(out, "{applied} migration(s) applied; database is current")?;
        }
        Command::Orgs(OrgsCommand::Add {
            ods,
            name,
            kind,
            region,
            office_phone,
            emergency_duty_phone,
            email,
        }) => {
            let db = open_db(&settings)?;
            let body = serde_json::json!({
                "ods_code": ods, "name": name, "kind": kind, "region": region,
                "office_phone": office_phone, "emergency_duty_phone": emergency_duty_phone, "email": email,
            });
            let org = crate::api::parse_organisation(body).map_err(api_error)?;
            let now = clock.now_naive();
            let (stored, created) = db
                .write_blocking(|conn| {
                    crate::api::store_organisation(conn, now, &Actor::cli(), org)
                })
                .map_err(api_error)?;
            writeln!(
                out,
                "{} organisation {} ({})",
                if created { "created" } else { "updated" },
                stored.ods_code,
                stored.name
            )?;
        }
        Command::Keys(KeysCommand::Create { org, roles }) => {
            let db = open_db(&settings)?;
            let mut v = Validator::default();
            let org = v.check("--org", OdsCode::parse(&org));
            let roles = crate::api::parse_roles(&mut v, Some(roles));
            v.finish().map_err(api_error)?;
            let org = org.expect("validated");
            let now = clock.now_naive();
            let (id, secret) = db
                .write_blocking(|conn| {
                    crate::api::create_key(conn, now, &Actor::cli(), &org, &roles)
                })
                .map_err(api_error)?;
            writeln!(out, "key id: {id}")?;
            writeln!(
                out,
                "organisation: {}  roles: {}",
                org,
                crate::auth::encode_roles(&roles)
            )?;
            writeln!(out, "store this key now; it is not shown again:")?;
            writeln!(out, "{secret}")?;
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let db = open_db(&settings)?;
            let now = clock.now_naive();
            db.write_blocking(|conn| crate::api::revoke_key(conn, now, &Actor::cli(), &id))
                .map_err(api_error)?;
            writeln!(out, "revoked key {id}")?;
        }
        Command::Plans(PlansCommand::Import { file, org }) => {
            let db = open_db(&settings)?;
            let org = OdsCode::parse(&org).map_err(|e| anyhow::anyhow!("--org {e}"))?;
            {
                let mut conn = db.get()?;
                if crate::db::models::Organisation::find(&mut conn, org.as_str())?.is_none() {
                    anyhow::bail!(
                        "no organisation has the ODS code {org}; add it with `cpis orgs add`"
                    );
                }
            }
            let size = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            if size as usize > crate::bulk::MAX_BYTES {
                anyhow::bail!(
                    "{} is larger than {} bytes; split it",
                    file.display(),
                    crate::bulk::MAX_BYTES
                );
            }
            let lines = {
                use std::io::BufRead;
                std::io::BufReader::new(std::fs::File::open(&file)?)
                    .split(b'\n')
                    .count()
                    .saturating_sub(1)
            };
            let bar = indicatif::ProgressBar::new(lines as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} rows {per_sec} {eta}",
                )
                .expect("valid template"),
            );
            let input = std::io::BufReader::new(std::fs::File::open(&file)?);
            let now = clock.now_naive();
            let result = crate::bulk::import_file(
                &db,
                now,
                clock.today(),
                &Actor::cli(),
                org.as_str(),
                input,
                |row| {
                    if row % 256 == 0 {
                        bar.set_position(row as u64);
                    }
                },
            )
            .map_err(api_error)?;
            bar.finish_and_clear();
            for r in result.rows.iter().filter(|r| r.code != "CPR06") {
                writeln!(
                    out,
                    "row {} ({}): {} {}",
                    r.row,
                    r.local_reference.as_deref().unwrap_or("-"),
                    r.code,
                    r.reasons.join("; ")
                )?;
            }
            writeln!(
                out,
                "{}: {} accepted, {} rejected{}",
                result.file_code,
                result.accepted,
                result.rejected,
                result.detail.map(|d| format!(" ({d})")).unwrap_or_default()
            )?;
            if result.file_code == "CPF01" {
                anyhow::bail!("the file is corrupt; nothing was imported");
            }
        }
        Command::Demo => {
            let db = open_db(&settings)?;
            crate::demo::run(&db, &clock, &settings.server.public_base_url, &mut out)?;
        }
        Command::Keys(KeysCommand::List) => {
            let db = open_db(&settings)?;
            let mut conn = db.get()?;
            for k in ApiKeyRow::list(&mut conn)? {
                let state = match k.revoked_at {
                    Some(at) => format!("revoked {}", format_timestamp(at)),
                    None => "active".into(),
                };
                writeln!(
                    out,
                    "{}  {}  {}  created {}  {}",
                    k.id,
                    k.org_ods,
                    k.roles,
                    format_timestamp(k.created_at),
                    state
                )?;
            }
        }
        Command::Audit(AuditCommand::Verify) => {
            let db = open_db(&settings)?;
            let mut conn = db.get()?;
            let report = audit::verify(&mut conn)?;
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
            if !report.ok {
                anyhow::bail!(
                    "audit chain broken at event {}",
                    report.first_broken_seq.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
