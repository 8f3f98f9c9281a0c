//! Typed configuration, layered from `config/default.toml`, `config/{CPIS_ENV}.toml` and `CPIS__SECTION__KEY`
//! environment variables, validated once at start-up. Secrets are `SecretString`s, so neither `Debug` nor a
//! log line can print them.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub mpi: MpiSettings,
    #[serde(default)]
    pub mail: MailSettings,
    #[serde(default)]
    pub webhook: WebhookSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub jobs: JobSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Base of links that cpis sends out (notification links in emails).
    pub public_base_url: String,
    /// Largest JSON body accepted, in bytes.
    pub json_limit: usize,
    /// Worker threads for HTTP; 0 means one per core.
    pub workers: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            public_base_url: "http://127.0.0.1:8080".into(),
            json_limit: 64 * 1024,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` (relative or `sqlite:///absolute`) or `postgres://...`. May hold a password.
    pub url: SecretString,
    pub pool_size: u32,
    /// How long a request waits for a pooled connection before failing, in seconds.
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://data/cpis.db"),
            pool_size: 16,
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Human,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive such as `info` or `cpis=debug,info`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    pub retention_days: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention_days: 8 * 366,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MpiSettings {
    /// Demographic score (0..1) at or above which a person is matched and auto-linked.
    pub matched_threshold: f64,
    /// Score at or above which a person is reported as a possible match (never auto-linked).
    pub possible_threshold: f64,
    /// Per region: which MPI resolves its local identifiers and demographics. Regions not named use the built-in.
    pub regions: std::collections::HashMap<String, RegionMpiSettings>,
}

impl Default for MpiSettings {
    fn default() -> Self {
        Self {
            matched_threshold: 0.80,
            possible_threshold: 0.50,
            regions: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MpiKind {
    Builtin,
    Pixm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionMpiSettings {
    pub kind: MpiKind,
    /// FHIR base of the region's PIXm/PDQm server, e.g. `https://mpi.example.nhs.uk/fhir`.
    pub base_url: Option<String>,
    #[serde(default = "default_mpi_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_mpi_rate")]
    pub rate_per_second: u32,
    #[serde(default = "default_mpi_cache_secs")]
    pub cache_secs: u64,
}

fn default_mpi_timeout_ms() -> u64 {
    3000
}
fn default_mpi_rate() -> u32 {
    5
}
fn default_mpi_cache_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTls {
    /// Plain connection upgraded with STARTTLS, which must succeed.
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No TLS: only with `allow_insecure = true`, for local development.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailSettings {
    /// SMTP relay; empty disables email delivery (notifications stay recorded).
    pub host: String,
    pub port: u16,
    pub tls: MailTls,
    pub allow_insecure: bool,
    /// PEM file of an extra trusted root certificate (a private CA).
    pub ca_cert: Option<std::path::PathBuf>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub from: String,
    /// Told when a notification cannot be delivered, and daily about authorities with no delivery endpoint.
    pub fallback_address: Option<String>,
    /// Whether notification emails carry the child's NHS number (initials are always the most a name shows).
    pub include_identifiers: bool,
    /// Seconds to wait for the SMTP server at each step of opening a session (connecting, TLS, greeting,
    /// STARTTLS, login); a whole send, opening included, is given up after twice this.
    pub timeout_secs: u64,
    /// SMTP sessions open at once, each kept for the next message: the most the deliverer sends in parallel
    /// to the relay. More sends wait for a session, rather than each opening a connection (and a TLS
    /// handshake) of its own that the pool would close again.
    pub max_connections: u32,
}

impl MailSettings {
    /// The most one email's whole send may take, opening a session included: twice `timeout_secs`.
    pub fn send_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs.saturating_mul(2))
    }
}

impl Default for MailSettings {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 587,
            tls: MailTls::Starttls,
            allow_insecure: false,
            ca_cert: None,
            username: None,
            password: None,
            from: "cpis <cpis@localhost.localdomain>".into(),
            fallback_address: None,
            include_identifiers: true,
            timeout_secs: 15,
            max_connections: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Allow webhook targets on private, loopback and link-local addresses (SSRF guard off). Tests only.
    pub allow_private_targets: bool,
    /// Allow `http://` webhook URLs. Tests only.
    pub allow_http: bool,
    pub timeout_secs: u64,
    /// Requests in flight at once to one receiver (scheme, host and port), each connection kept for the next:
    /// a backlog does not open a connection (and a TLS handshake) per webhook to one authority's receiver.
    pub max_connections: u32,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            allow_http: false,
            timeout_secs: 10,
            max_connections: 16,
        }
    }
}

/// What a notification from a sensitive setting (`SARC`, `SEXUAL_HEALTH`, `TOP`) may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensitivePolicy {
    Notify,
    NotifyWithoutSettingName,
    DoNotNotify,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Delay before each attempt: the first is (close to) immediate; after the last the notification is dead.
    pub retry_schedule: Vec<String>,
    /// How long a claimed delivery stays with one instance before another may take it over, seconds.
    pub lease_secs: u64,
    /// How many deliveries one `deliver` tick claims.
    pub batch_size: i64,
    /// How many deliveries are in flight at once.
    pub concurrency: usize,
    /// A check and an attendance of one person at one setting within this many hours make one notification.
    pub visit_window_hours: i64,
    pub sensitive_settings: SensitivePolicy,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            retry_schedule: [
                "0s", "5s", "5m", "30m", "2h", "5h", "10h", "14h", "20h", "24h",
            ]
            .map(String::from)
            .to_vec(),
            // A claim is sent in at most four waves; even if every send of every wave waits for its full
            // timeout (15 s for mail), the lease outlasts it.
            lease_secs: 120,
            batch_size: 1000,
            concurrency: 256,
            visit_window_hours: 24,
            sensitive_settings: SensitivePolicy::NotifyWithoutSettingName,
        }
    }
}

impl DeliverySettings {
    pub fn schedule(&self) -> Result<Vec<std::time::Duration>, ConfigError> {
        self.retry_schedule
            .iter()
            .map(|s| {
                parse_duration(s)
                    .map_err(|e| invalid("delivery.retry_schedule", format!("`{s}`: {e}")))
            })
            .collect()
    }
}

/// `500ms`, `5s`, `5m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("needs a unit: ms, s, m, h or d")?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| "must start with a whole number".to_string())?;
    let secs = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err("unit must be ms, s, m, h or d".into()),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// Cron expressions (with a seconds field) for the scheduled jobs; an empty string disables a job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSettings {
    pub deliver: String,
    pub expire: String,
    pub purge: String,
    pub rematch: String,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            deliver: "*/2 * * * * *".into(),
            expire: "0 5 0 * * *".into(),
            purge: "0 30 1 * * *".into(),
            rematch: "0 */5 * * * *".into(),
        }
    }
}

impl JobSettings {
    /// The parsed schedule of each enabled job, or an error naming the bad key.
    pub fn schedules(&self) -> Result<Vec<(&'static str, cron::Schedule)>, ConfigError> {
        use std::str::FromStr;
        let mut out = Vec::new();
        for (name, key, expr) in [
            ("deliver", "jobs.deliver", &self.deliver),
            ("expire", "jobs.expire", &self.expire),
            ("purge", "jobs.purge", &self.purge),
            ("rematch", "jobs.rematch", &self.rematch),
        ] {
            if expr.trim().is_empty() {
                continue;
            }
            let schedule = cron::Schedule::from_str(expr).map_err(|e| {
                invalid(
                    key,
                    format!("`{expr}` is not a cron expression with a seconds field: {e}"),
                )
            })?;
            out.push((name, schedule));
        }
        Ok(out)
    }
}

/// How long personal data is kept (the `purge` job). Audit events are kept apart, for `audit.retention_days`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// CPP and LAC plans without a delete date go this many months after their end date.
    pub cpp_lac_months_after_end: u32,
    /// UCPP plans without a delete date go this many days after their end date or expected delivery date.
    pub ucpp_days_after_end: u32,
    /// Attendances, recorded accesses and notification contents go this many days after they happened.
    pub activity_days: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            cpp_lac_months_after_end: 12,
            ucpp_days_after_end: 28,
            activity_days: 730,
        }
    }
}

/// Which database the URL names, with what the driver needs to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite { path: PathBuf },
    Postgres,
}

impl DatabaseSettings {
    pub fn kind(&self) -> Result<DatabaseKind, ConfigError> {
        let url = self.url.expose_secret();
        if let Some(rest) = url.strip_prefix("sqlite://") {
            if rest.is_empty() {
                return Err(invalid(
                    "database.url",
                    "sqlite:// needs a file path, e.g. sqlite://data/cpis.db",
                ));
            }
            Ok(DatabaseKind::Sqlite {
                path: PathBuf::from(rest),
            })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseKind::Postgres)
        } else {
            Err(invalid(
                "database.url",
                "must start with sqlite:// or postgres://",
            ))
        }
    }
}

impl Settings {
    /// Loads the layers from `dir` (normally `config/`); missing files are fine, bad values are not.
    pub fn load_from(dir: &Path) -> Result<Self, ConfigError> {
        let env = std::env::var("CPIS_ENV").unwrap_or_else(|_| "local".into());
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")).required(false))
            .add_source(config::File::from(dir.join(format!("{env}.toml"))).required(false))
            .add_source(
                config::Environment::with_prefix("CPIS")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("delivery.retry_schedule")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Loads from `$CPIS_CONFIG_DIR`, or `config/` in the working directory.
    pub fn load() -> Result<Self, ConfigError> {
        let dir = std::env::var_os("CPIS_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "config".into());
        Self::load_from(&dir)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.kind()?;
        if self.database.pool_size == 0 {
            return Err(invalid("database.pool_size", "must be at least 1"));
        }
        if self.server.json_limit < 1024 {
            return Err(invalid("server.json_limit", "must be at least 1024 bytes"));
        }
        if !(self.server.public_base_url.starts_with("http://")
            || self.server.public_base_url.starts_with("https://"))
        {
            return Err(invalid(
                "server.public_base_url",
                "must be an http:// or https:// URL",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("is not a valid filter: {e}")))?;
        let mpi = &self.mpi;
        if !(0.0 < mpi.possible_threshold
            && mpi.possible_threshold < mpi.matched_threshold
            && mpi.matched_threshold <= 1.0)
        {
            return Err(invalid(
                "mpi.matched_threshold",
                "thresholds must satisfy 0 < possible_threshold < matched_threshold <= 1",
            ));
        }
        for (region, r) in &mpi.regions {
            crate::domain::parse_region(region)
                .map_err(|e| invalid("mpi.regions", format!("region `{region}` {e}")))?;
            if r.kind == MpiKind::Pixm {
                match &r.base_url {
                    Some(u) if u.starts_with("https://") || u.starts_with("http://") => {}
                    _ => {
                        return Err(invalid(
                            "mpi.regions",
                            format!("region `{region}` of kind pixm needs an http(s) base_url"),
                        ))
                    }
                }
                if r.timeout_ms == 0 || r.rate_per_second == 0 {
                    return Err(invalid(
                        "mpi.regions",
                        format!("region `{region}` needs timeout_ms and rate_per_second above 0"),
                    ));
                }
            }
        }
        self.jobs.schedules()?;
        let schedule = self.delivery.schedule()?;
        if schedule.is_empty() {
            return Err(invalid(
                "delivery.retry_schedule",
                "needs at least one attempt",
            ));
        }
        if self.delivery.batch_size < 1
            || self.delivery.concurrency < 1
            || self.delivery.lease_secs < 5
        {
            return Err(invalid(
                "delivery.batch_size",
                "batch_size and concurrency must be at least 1, lease_secs at least 5",
            ));
        }
        if !self.mail.host.is_empty() {
            if self.mail.tls == MailTls::None && !self.mail.allow_insecure {
                return Err(invalid("mail.tls", "`none` sends mail in clear; set mail.allow_insecure = true to allow it (development only)"));
            }
            crate::domain::parse_email(
                self.mail
                    .from
                    .rsplit_once('<')
                    .map(|(_, a)| a.trim_end_matches('>'))
                    .unwrap_or(&self.mail.from),
            )
            .map_err(|e| invalid("mail.from", e))?;
            if let Some(path) = &self.mail.ca_cert {
                if !path.exists() {
                    return Err(invalid(
                        "mail.ca_cert",
                        format!("{} does not exist", path.display()),
                    ));
                }
            }
        }
        if let Some(a) = &self.mail.fallback_address {
            crate::domain::parse_email(a).map_err(|e| invalid("mail.fallback_address", e))?;
        }
        if self.webhook.timeout_secs == 0 {
            return Err(invalid("webhook.timeout_secs", "must be at least 1"));
        }
        if self.mail.timeout_secs == 0 {
            return Err(invalid("mail.timeout_secs", "must be at least 1"));
        }
        if !(1..=1000).contains(&self.mail.max_connections) {
            return Err(invalid(
                "mail.max_connections",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=1000).contains(&self.webhook.max_connections) {
            return Err(invalid(
                "webhook.max_connections",
                "must be between 1 and 1000",
            ));
        }
        if self.audit.retention_days < 365 {
            return Err(invalid("audit.retention_days", "must be at least 365 days"));
        }
        Ok(())
    }

    /// Settings for tests and tools: defaults with the given database.
    pub fn for_database(url: &str) -> Self {
        let mut s = Settings {
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            log: LogSettings::default(),
            audit: AuditSettings::default(),
            mpi: MpiSettings::default(),
            mail: MailSettings::default(),
            webhook: WebhookSettings::default(),
            delivery: DeliverySettings::default(),
            jobs: JobSettings::default(),
            retention: RetentionSettings::default(),
        };
        s.database.url = SecretString::from(url.to_string());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_kind_is_chosen_by_scheme() {
        let s = Settings::for_database("sqlite://data/cpis.db");
        assert_eq!(
            s.database.kind().unwrap(),
            DatabaseKind::Sqlite {
                path: "data/cpis.db".into()
            }
        );
        let s = Settings::for_database("sqlite:///var/lib/cpis.db");
        assert_eq!(
            s.database.kind().unwrap(),
            DatabaseKind::Sqlite {
                path: "/var/lib/cpis.db".into()
            }
        );
        let s = Settings::for_database("postgres://u:p@h/db");
        assert_eq!(s.database.kind().unwrap(), DatabaseKind::Postgres);
        let err = Settings::for_database("mysql://x")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed_by_debug() {
        let s = Settings::for_database("postgres://cpis:hunter2@db/cpis");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn bad_cron_strings_and_durations_name_their_key_and_empty_disables() {
        let mut s = Settings::for_database("sqlite://x.db");
        s.jobs.purge = "every night".into();
        assert!(s.validate().unwrap_err().to_string().contains("jobs.purge"));
        s.jobs.purge = String::new();
        assert!(s.validate().is_ok());
        assert_eq!(s.jobs.schedules().unwrap().len(), 3);
        s.delivery.retry_schedule = vec!["5s".into(), "5 minutes".into()];
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("delivery.retry_schedule"));
        assert_eq!(
            parse_duration("250ms").unwrap(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("2h").unwrap(),
            std::time::Duration::from_secs(7200)
        );
    }

    #[test]
    fn environment_variables_override_files_and_lists_are_comma_separated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.toml"),
            "[server]\nport = 9000\n[mail]\nfrom = \"a@b.example.org\"\n",
        )
        .unwrap();
        // SAFETY of the test: these variables are read only by this test's load.
        std::env::set_var("CPIS__DELIVERY__RETRY_SCHEDULE", "0s,5s,5m");
        std::env::set_var("CPIS__MAIL__PASSWORD", "12345");
        std::env::set_var("CPIS__WEBHOOK__ALLOW_HTTP", "true");
        let s = Settings::load_from(dir.path()).unwrap();
        std::env::remove_var("CPIS__DELIVERY__RETRY_SCHEDULE");
        std::env::remove_var("CPIS__MAIL__PASSWORD");
        std::env::remove_var("CPIS__WEBHOOK__ALLOW_HTTP");
        assert_eq!(s.server.port, 9000);
        assert_eq!(s.delivery.retry_schedule, ["0s", "5s", "5m"]);
        assert_eq!(
            s.mail
                .password
                .as_ref()
                .map(|p| p.expose_secret().to_string()),
            Some("12345".into())
        );
        assert!(s.webhook.allow_http);
    }

    #[test]
    fn mail_in_clear_needs_an_explicit_insecure_setting() {
        let mut s = Settings::for_database("sqlite://x.db");
        s.mail.host = "smtp.example.org".into();
        s.mail.tls = MailTls::None;
        assert!(s.validate().unwrap_err().to_string().contains("mail.tls"));
        s.mail.allow_insecure = true;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn mail_needs_at_least_one_session_and_a_timeout() {
        let refused_for = |s: &Settings| s.validate().unwrap_err().to_string();
        let mut s = Settings::for_database("sqlite://x.db");
        assert_eq!(s.mail.max_connections, 8);
        s.mail.max_connections = 0;
        assert!(refused_for(&s).contains("mail.max_connections"));
        s.mail.max_connections = 1;
        s.webhook.max_connections = 0;
        assert!(refused_for(&s).contains("webhook.max_connections"));
        s.webhook.max_connections = 1;
        s.mail.timeout_secs = 0;
        assert!(refused_for(&s).contains("mail.timeout_secs"));
    }

    #[test]
    fn a_bad_log_level_names_the_key() {
        let mut s = Settings::for_database("sqlite://x.db");
        s.log.level = "info,=[".into();
        assert!(s.validate().unwrap_err().to_string().contains("log.level"));
    }
}
