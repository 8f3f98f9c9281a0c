//! Notification email through lettre over SMTP with TLS required (STARTTLS or implicit TLS; clear text only with
//! an explicit insecure development setting). Pooled connections are reused between messages. A stable
//! `Message-ID` per notification makes a resend recognisable; the subject never identifies a child.

use crate::config::{MailSettings, MailTls};
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
    /// Without angle brackets: `<id>@<domain>`.
    pub message_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailError {
    pub code: Option<u16>,
    pub message: String,
}

#[cfg_attr(test, mockall::automock)]
#[async_trait::async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError>;
}

/// A mailer for a deployment with no SMTP relay configured: every send fails visibly.
pub struct NoMailer;

#[async_trait::async_trait]
impl Mailer for NoMailer {
    async fn send(&self, _: &OutgoingEmail) -> Result<(), MailError> {
        Err(MailError {
            code: None,
            message: "no SMTP relay is configured (mail.host)".into(),
        })
    }
}

pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpMailer {
    pub fn new(settings: &MailSettings) -> anyhow::Result<Self> {
        let host = settings.host.as_str();
        let mut tls = TlsParameters::builder(host.to_string());
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("mail.ca_cert {}: {e}", path.display()))?;
            tls = tls.add_root_certificate(
                Certificate::from_pem(&pem).map_err(|e| anyhow::anyhow!("mail.ca_cert: {e}"))?,
            );
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| anyhow::anyhow!("mail TLS settings: {e}"))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(settings.port)
            .timeout(Some(Duration::from_secs(settings.timeout_secs)))
            .pool_config(
                PoolConfig::new()
                    .max_size(8)
                    .idle_timeout(Duration::from_secs(60)),
            );
        builder = match settings.tls {
            MailTls::Starttls => builder.tls(Tls::Required(tls)),
            MailTls::Tls => builder.tls(Tls::Wrapper(tls)),
            MailTls::None if settings.allow_insecure => builder.tls(Tls::None),
            MailTls::None => anyhow::bail!("mail.tls = none needs mail.allow_insecure = true"),
        };
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_string(),
            ));
        }
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail.from: {e}"))?;
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }

    /// The domain of the sender, for Message-IDs.
    pub fn domain(&self) -> String {
        self.from.email.domain().to_string()
    }
}

#[async_trait::async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(email.subject.clone())
            .message_id(Some(format!("<{}>", email.message_id)))
            .header(ContentType::TEXT_PLAIN);
        for to in &email.to {
            let mailbox: Mailbox = to.parse().map_err(|e| MailError {
                code: None,
                message: format!("bad address: {e}"),
            })?;
            builder = builder.to(mailbox);
        }
        let message = builder.body(email.body.clone()).map_err(|e| MailError {
            code: None,
            message: e.to_string(),
        })?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| MailError {
                code: e.status().map(u16::from),
                message: e.to_string().chars().take(300).collect(),
            })
    }
}
