//! Notification email over SMTP with TLS required (STARTTLS or implicit TLS; clear text only with an explicit
//! insecure development setting), spoken by lettre's SMTP client. A stable `Message-ID` per notification makes
//! a resend recognisable; the subject never identifies a child.
//!
//! cpis keeps its own sessions rather than lettre's pooled transport, for two reasons the benchmark found:
//!
//! - lettre's pool does not bound the sessions open at once: with a deliverer sending hundreds of emails in
//!   parallel, each send that found no idle session opened a new connection, with its own TLS handshake, and
//!   the pool closed all but a few again afterwards (about one connection for every five emails). The
//!   deliverer now runs no more email sends at once than [`MailSettings::max_connections`], and this mailer
//!   keeps that many sessions open between messages.
//! - lettre writes a message and its closing `.` as two writes. On a session kept open, Nagle's algorithm held
//!   the second until the relay acknowledged the first, which a relay delays by up to 40 ms while it waits for
//!   the rest: about 40 ms for every email after a session's first. The sessions here are opened with
//!   `TCP_NODELAY`, which lettre's own connections do not set.

use crate::config::{MailSettings, MailTls};
use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use lettre::Message;
use secrecy::ExposeSecret;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

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
    host: String,
    port: u16,
    /// STARTTLS: lettre upgrades the session it holds.
    starttls: Option<TlsParameters>,
    /// Implicit TLS: the connection is encrypted before SMTP starts.
    implicit: Option<(TlsConnector, ServerName<'static>)>,
    credentials: Option<Credentials>,
    hello: ClientId,
    /// How long each step of opening a session (connecting, TLS, greeting, STARTTLS, login) may take.
    step: Duration,
    /// How long a whole send may take, opening included ([`MailSettings::send_limit`]).
    send_limit: Duration,
    /// Sessions open between messages, the most recently used last.
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    keep: usize,
    from: Mailbox,
}

/// A session idle this long is closed rather than used again (relays close idle sessions after a few minutes).
const IDLE_FOR_AT_MOST: Duration = Duration::from_secs(60);

impl SmtpMailer {
    pub fn new(settings: &MailSettings) -> anyhow::Result<Self> {
        let host = settings.host.as_str();
        let extra_root = match &settings.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("mail.ca_cert {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let (starttls, implicit) = match settings.tls {
            MailTls::Starttls => {
                let mut tls = TlsParameters::builder(host.to_string());
                if let Some(pem) = &extra_root {
                    tls = tls.add_root_certificate(
                        Certificate::from_pem(pem)
                            .map_err(|e| anyhow::anyhow!("mail.ca_cert: {e}"))?,
                    );
                }
                let tls = tls
                    .build_rustls()
                    .map_err(|e| anyhow::anyhow!("mail TLS settings: {e}"))?;
                (Some(tls), None)
            }
            MailTls::Tls => (None, Some(implicit_tls(host, extra_root.as_deref())?)),
            MailTls::None if settings.allow_insecure => (None, None),
            MailTls::None => anyhow::bail!("mail.tls = none needs mail.allow_insecure = true"),
        };
        let credentials = match (&settings.username, &settings.password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose_secret().to_string(),
            )),
            _ => None,
        };
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail.from: {e}"))?;
        Ok(Self {
            host: host.to_string(),
            port: settings.port,
            starttls,
            implicit,
            credentials,
            hello: ClientId::default(),
            step: Duration::from_secs(settings.timeout_secs),
            send_limit: settings.send_limit(),
            idle: Mutex::new(Vec::new()),
            keep: settings.max_connections as usize,
            from,
        })
    }

    /// The domain of the sender, for Message-IDs.
    pub fn domain(&self) -> String {
        self.from.email.domain().to_string()
    }

    /// A session ready for a message: an idle one that still answers, or a new one.
    async fn session(&self) -> Result<AsyncSmtpConnection, MailError> {
        loop {
            let parked = self.parked().pop();
            match parked {
                Some((mut conn, since)) => {
                    if since.elapsed() < IDLE_FOR_AT_MOST && conn.test_connected().await {
                        return Ok(conn);
                    }
                    conn.abort().await;
                }
                None => return self.open().await,
            }
        }
    }

    async fn open(&self) -> Result<AsyncSmtpConnection, MailError> {
        let tcp = self
            .within(TcpStream::connect((self.host.as_str(), self.port)))
            .await?
            .map_err(|e| io_error("could not connect", e))?;
        tcp.set_nodelay(true)
            .map_err(|e| io_error("could not set TCP_NODELAY", e))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.implicit {
            Some((connector, name)) => Box::new(ImplicitTls(
                self.within(connector.connect(name.clone(), tcp))
                    .await?
                    .map_err(|e| io_error("TLS", e))?,
            )),
            None => Box::new(tcp),
        };
        let mut conn = self
            .within(AsyncSmtpConnection::connect_with_transport(
                stream,
                &self.hello,
            ))
            .await?
            .map_err(smtp_error)?;
        if let Some(tls) = &self.starttls {
            self.within(conn.starttls(tls.clone(), &self.hello))
                .await?
                .map_err(smtp_error)?;
        }
        if let Some(credentials) = &self.credentials {
            self.within(conn.auth(DEFAULT_MECHANISMS, credentials))
                .await?
                .map_err(smtp_error)?;
        }
        Ok(conn)
    }

    async fn within<T>(&self, step: impl std::future::Future<Output = T>) -> Result<T, MailError> {
        tokio::time::timeout(self.step, step)
            .await
            .map_err(|_| MailError {
                code: None,
                message: format!(
                    "the SMTP server did not answer within {} s",
                    self.step.as_secs()
                ),
            })
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<(AsyncSmtpConnection, Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a session that is still good for the next message, or closes it.
    async fn park(&self, mut conn: AsyncSmtpConnection) {
        if !conn.has_broken() {
            let mut idle = self.parked();
            if idle.len() < self.keep {
                idle.push((conn, Instant::now()));
                return;
            }
        }
        conn.abort().await;
    }

    async fn deliver(&self, envelope: &Envelope, message: &[u8]) -> Result<(), MailError> {
        let mut conn = self.session().await?;
        let sent = conn.send(envelope, message).await;
        self.park(conn).await;
        sent.map(|_| ()).map_err(smtp_error)
    }
}

fn smtp_error(e: lettre::transport::smtp::Error) -> MailError {
    MailError {
        code: e.status().map(u16::from),
        message: e.to_string().chars().take(300).collect(),
    }
}

fn io_error(what: &str, e: std::io::Error) -> MailError {
    MailError {
        code: None,
        message: format!("{what}: {e}").chars().take(300).collect(),
    }
}

/// The connector for implicit TLS (`mail.tls = "tls"`): the platform-independent web PKI roots, as lettre's
/// STARTTLS uses, and the extra root of `mail.ca_cert`.
fn implicit_tls(
    host: &str,
    extra_root: Option<&[u8]>,
) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_root {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("mail.ca_cert: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("mail.ca_cert: {e}"))?;
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| anyhow::anyhow!("mail TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| anyhow::anyhow!("mail.host {host}: {e}"))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// A connection encrypted before SMTP starts, handed to lettre as the stream it speaks SMTP over.
#[derive(Debug)]
struct ImplicitTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        let limit = self.send_limit;
        tokio::time::timeout(
            limit,
            self.deliver(message.envelope(), &message.formatted()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(MailError {
                code: None,
                message: format!("timed out after {} s", limit.as_secs()),
            })
        })
    }
}
