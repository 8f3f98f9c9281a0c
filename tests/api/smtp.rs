//! A real SMTP server for the tests, on loopback, that requires STARTTLS before it accepts mail, with a
//! certificate issued in the test by a throwaway CA (whose PEM the service is given as `mail.ca_cert`).

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
    pub over_tls: bool,
    /// When the server had the whole message (for write-to-receipt latency in the benchmark).
    pub received: std::time::Instant,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.data
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
    }

    /// The notification a mail is about: its `Message-ID` is `<notification id>@<domain>`.
    pub fn notification_id(&self) -> Option<String> {
        let id = self.header("Message-ID")?;
        let id = id.trim_start_matches('<');
        id.split_once('@').map(|(n, _)| n.to_string())
    }

    /// The body after the headers, with quoted-printable soft line breaks undone.
    pub fn body(&self) -> String {
        let body = self
            .data
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        body.replace("=\r\n", "").replace("=3D", "=")
    }
}

pub struct SmtpServer {
    pub port: u16,
    pub ca_cert: PathBuf,
    pub mails: Arc<Mutex<Vec<Mail>>>,
    /// Connections that tried to send mail without STARTTLS and were refused.
    pub refused_plain: Arc<Mutex<usize>>,
    /// Connections accepted, open now, and the most open at once.
    pub connections: Arc<Connections>,
    /// How long the server takes to accept each message once it has it all (a slow relay).
    pub delay: Arc<Mutex<std::time::Duration>>,
    acceptor: TlsAcceptor,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl SmtpServer {
    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

#[derive(Debug, Default)]
pub struct Connections {
    pub accepted: AtomicUsize,
    pub open: AtomicUsize,
    pub most_open: AtomicUsize,
}

/// Counts a connection open for as long as it lives.
struct Counted(Arc<Connections>);

impl Counted {
    fn new(c: &Arc<Connections>) -> Self {
        c.accepted.fetch_add(1, Ordering::SeqCst);
        let open = c.open.fetch_add(1, Ordering::SeqCst) + 1;
        c.most_open.fetch_max(open, Ordering::SeqCst);
        Counted(c.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How the server starts a session: plain with STARTTLS offered, or TLS from the first byte (implicit TLS).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Starttls,
    Implicit,
}

struct Tls {
    acceptor: TlsAcceptor,
    ca_pem: String,
}

fn make_tls() -> Tls {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cpis test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_pem: ca.pem(),
    }
}

/// Starts the server on `port` (0 for any free one).
pub async fn start_smtp(port: u16) -> SmtpServer {
    start(port, make_tls(), Mode::Starttls).await
}

/// Starts a server that speaks TLS from the first byte, as on port 465.
pub async fn start_smtp_implicit_tls() -> SmtpServer {
    start(0, make_tls(), Mode::Implicit).await
}

/// Starts another server on `port` with the same certificate as `like` (the same server, back up).
pub async fn start_smtp_like(port: u16, like: &SmtpServer) -> SmtpServer {
    start(
        port,
        Tls {
            acceptor: like.acceptor.clone(),
            ca_pem: like.ca_pem.clone(),
        },
        Mode::Starttls,
    )
    .await
}

async fn start(port: u16, tls: Tls, mode: Mode) -> SmtpServer {
    let dir = tempfile::tempdir().unwrap();
    let ca_cert = dir.path().join("ca.pem");
    std::fs::write(&ca_cert, &tls.ca_pem).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0));
    let connections = Arc::new(Connections::default());
    let delay = Arc::new(Mutex::new(std::time::Duration::ZERO));
    let (sink, refused_sink, acceptor) = (mails.clone(), refused.clone(), tls.acceptor.clone());
    let (counts, slow) = (connections.clone(), delay.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (sink, refused_sink, acceptor) =
                (sink.clone(), refused_sink.clone(), acceptor.clone());
            let counted = Counted::new(&counts);
            let s = Session {
                sink,
                refused: refused_sink,
                delay: slow.clone(),
            };
            tokio::spawn(async move {
                let _counted = counted;
                if mode == Mode::Implicit {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut reader = BufReader::new(stream);
                    if greet(&mut reader).await {
                        let _ = session(&mut reader, true, &s).await;
                    }
                    return;
                }
                let mut reader = BufReader::new(tcp);
                if !greet(&mut reader).await {
                    return;
                }
                match session(&mut reader, false, &s).await {
                    Step::StartTls => {
                        let tcp = reader.into_inner();
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut reader = BufReader::new(stream);
                        let _ = session(&mut reader, true, &s).await;
                    }
                    Step::Done => {}
                }
            });
        }
    });
    SmtpServer {
        port,
        ca_cert,
        mails,
        refused_plain: refused,
        connections,
        delay,
        acceptor: tls.acceptor,
        ca_pem: tls.ca_pem,
        _dir: dir,
    }
}

enum Step {
    StartTls,
    Done,
}

/// What every session of one server shares.
struct Session {
    sink: Arc<Mutex<Vec<Mail>>>,
    refused: Arc<Mutex<usize>>,
    delay: Arc<Mutex<std::time::Duration>>,
}

async fn greet<S: AsyncRead + AsyncWrite + Unpin>(reader: &mut BufReader<S>) -> bool {
    reader
        .get_mut()
        .write_all(b"220 localhost ESMTP cpis-test\r\n")
        .await
        .is_ok()
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut BufReader<S>,
    tls: bool,
    shared: &Session,
) -> Step {
    let Session {
        sink,
        refused,
        delay,
    } = shared;
    let mut from = String::new();
    let mut to = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return Step::Done,
            Ok(_) => {}
        }
        let command = line.trim_end().to_string();
        let upper = command.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            if tls {
                "250-localhost\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n".into()
            } else {
                "250-localhost\r\n250-STARTTLS\r\n250 8BITMIME\r\n".into()
            }
        } else if upper == "STARTTLS" && !tls {
            let _ = reader
                .get_mut()
                .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                .await;
            return Step::StartTls;
        } else if upper.starts_with("MAIL FROM:") {
            if !tls {
                *refused.lock().unwrap() += 1;
                "530 5.7.0 Must issue a STARTTLS command first\r\n".into()
            } else {
                from = command[10..]
                    .trim()
                    .trim_matches(|c| c == '<' || c == '>')
                    .split('>')
                    .next()
                    .unwrap_or("")
                    .to_string();
                "250 2.1.0 OK\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            to.push(
                command[8..]
                    .trim()
                    .trim_matches(|c| c == '<' || c == '>')
                    .to_string(),
            );
            "250 2.1.5 OK\r\n".into()
        } else if upper == "DATA" {
            let _ = reader
                .get_mut()
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await;
            let mut data = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return Step::Done,
                    Ok(_) => {}
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            let delay = *delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            sink.lock().unwrap().push(Mail {
                from: from.clone(),
                to: std::mem::take(&mut to),
                data,
                over_tls: tls,
                received: std::time::Instant::now(),
            });
            "250 2.0.0 OK queued\r\n".into()
        } else if upper == "RSET" {
            to.clear();
            "250 2.0.0 OK\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "QUIT" {
            let _ = reader.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
            return Step::Done;
        } else {
            "502 5.5.2 Command not recognised\r\n".into()
        };
        if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return Step::Done;
        }
    }
}
