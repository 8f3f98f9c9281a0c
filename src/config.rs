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
                    .try_parsing(false),
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
    fn a_bad_log_level_names_the_key() {
        let mut s = Settings::for_database("sqlite://x.db");
        s.log.level = "info,=[".into();
        assert!(s.validate().unwrap_err().to_string().contains("log.level"));
    }
}
