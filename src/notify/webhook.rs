//! Webhooks signed per the Standard Webhooks specification: `webhook-id` (the notification id, the same on
//! every retry), `webhook-timestamp`, `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`,
//! one signature per current secret, space-separated, so a receiver can rotate). No redirects, a timeout, HTTPS
//! only, and no private, loopback or link-local targets unless configuration allows them (SSRF).

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub const SECRET_PREFIX: &str = "whsec_";

/// A new endpoint secret: `whsec_` and 32 random bytes in base64.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Checks a caller-supplied secret: `whsec_` and base64 of 24 to 64 bytes.
pub fn parse_secret(s: &str) -> Result<String, String> {
    let key = s
        .strip_prefix(SECRET_PREFIX)
        .ok_or("must start with whsec_")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| "must be whsec_ followed by base64")?;
    if !(24..=64).contains(&bytes.len()) {
        return Err("must carry 24 to 64 bytes of key".into());
    }
    Ok(s.to_string())
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the key inside a `whsec_` secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .unwrap_or_else(|_| secret.as_bytes().to_vec());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Addresses a webhook must never reach unless configuration allows: loopback, private, link-local, carrier-grade
/// NAT, unique-local, unspecified, multicast, broadcast and documentation ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TargetPolicy {
    pub allow_private: bool,
    pub allow_http: bool,
}

/// Checks a webhook URL as far as can be done without DNS: scheme, host, and a literal address.
pub fn check_url(url: &str, policy: TargetPolicy) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "must be an absolute URL".to_string())?;
    match parsed.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        _ => return Err("must use https".into()),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let host = parsed.host().ok_or("must name a host")?;
    if !policy.allow_private {
        let literal = match host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(d)
                if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
            {
                return Err("must not point at this machine".into())
            }
            url::Host::Domain(_) => None,
        };
        if literal.is_some_and(|ip| !is_public(ip)) {
            return Err("must not point at a private, loopback or link-local address".into());
        }
    }
    Ok(parsed)
}

/// DNS for webhook requests that drops disallowed addresses, so a public name that resolves to a private
/// address (or is re-pointed there later) is refused at connection time too.
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    "the webhook host resolves only to private, loopback or link-local addresses"
                        .into(),
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub url: String,
    pub id: String,
    pub timestamp: i64,
    pub body: String,
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WebhookOutcome {
    Delivered {
        status: u16,
    },
    /// 410 Gone: the receiver wants no more; the endpoint is disabled.
    Gone,
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
}

#[cfg_attr(test, mockall::automock)]
#[async_trait::async_trait]
pub trait WebhookClient: Send + Sync {
    async fn post(&self, request: &WebhookRequest) -> WebhookOutcome;
}

pub struct HttpWebhookClient {
    client: reqwest::Client,
    policy: TargetPolicy,
}

impl HttpWebhookClient {
    pub fn new(settings: &crate::config::WebhookSettings) -> anyhow::Result<Self> {
        let policy = TargetPolicy {
            allow_private: settings.allow_private_targets,
            allow_http: settings.allow_http,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs))
            .connect_timeout(Duration::from_secs(settings.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            // The deliverer sends at most this many at once to one receiver, so each connection is kept.
            .pool_max_idle_per_host(settings.max_connections as usize)
            .user_agent(concat!("cpis/", env!("CARGO_PKG_VERSION")));
        if !policy.allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        Ok(Self {
            client: builder.build()?,
            policy,
        })
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

#[async_trait::async_trait]
impl WebhookClient for HttpWebhookClient {
    async fn post(&self, r: &WebhookRequest) -> WebhookOutcome {
        if let Err(e) = check_url(&r.url, self.policy) {
            return WebhookOutcome::Failed {
                status: None,
                error: format!("webhook URL refused: {e}"),
                retry_after: None,
            };
        }
        let signatures: Vec<String> = r
            .secrets
            .iter()
            .map(|s| sign(s, &r.id, r.timestamp, &r.body))
            .collect();
        let sent = self
            .client
            .post(&r.url)
            .header("content-type", "application/json")
            .header("webhook-id", &r.id)
            .header("webhook-timestamp", r.timestamp.to_string())
            .header("webhook-signature", signatures.join(" "))
            .body(r.body.clone())
            .send()
            .await;
        match sent {
            Err(e) => {
                let error = if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    error_chain(&e)
                };
                WebhookOutcome::Failed {
                    status: None,
                    error,
                    retry_after: None,
                }
            }
            Ok(res) => {
                let status = res.status().as_u16();
                match status {
                    200..=299 => WebhookOutcome::Delivered { status },
                    410 => WebhookOutcome::Gone,
                    _ => WebhookOutcome::Failed {
                        status: Some(status),
                        error: if (300..400).contains(&status) {
                            "redirects are not followed".into()
                        } else {
                            format!("answered {status}")
                        },
                        retry_after: retry_after(res.headers()),
                    },
                }
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_reference_example() {
        // The example in the Standard Webhooks specification's reference implementations.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn generated_secrets_parse_and_differ() {
        let a = generate_secret();
        assert!(parse_secret(&a).is_ok());
        assert_ne!(a, generate_secret());
        assert!(parse_secret("whsec_short").is_err());
        assert!(parse_secret("secret").is_err());
    }

    #[test]
    fn private_loopback_and_link_local_targets_are_refused() {
        let strict = TargetPolicy {
            allow_private: false,
            allow_http: false,
        };
        for bad in [
            "http://example.org/hook",
            "https://127.0.0.1/hook",
            "https://10.1.2.3/hook",
            "https://192.168.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://[fd00::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://localhost/hook",
            "https://user:pw@example.org/hook",
            "ftp://example.org/hook",
        ] {
            assert!(check_url(bad, strict).is_err(), "{bad}");
        }
        assert!(check_url("https://la.example.org/cpis", strict).is_ok());
        let lax = TargetPolicy {
            allow_private: true,
            allow_http: true,
        };
        assert!(check_url("http://127.0.0.1:9000/hook", lax).is_ok());
    }
}
