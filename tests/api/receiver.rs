//! A webhook receiver on loopback that checks every Standard Webhooks signature itself (with `ring`, not the
//! service's HMAC code) and answers as a test tells it to.

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Hook {
    pub id: String,
    pub timestamp: i64,
    pub body: serde_json::Value,
    /// The secrets (of those the test gave) that one of the signatures verifies with.
    pub verified_with: Vec<String>,
    pub signatures: usize,
    /// The status the receiver answered.
    pub status: u16,
}

#[derive(Default)]
pub struct Behaviour {
    /// Statuses to answer, in order; once used up, `then`.
    pub script: VecDeque<u16>,
    pub then: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
}

/// Connections the receiver accepted, and the most requests it had in hand at once.
#[derive(Debug, Default)]
pub struct Load {
    pub connections: AtomicUsize,
    in_hand: AtomicUsize,
    pub most_in_hand: AtomicUsize,
}

pub struct Receiver {
    pub url: String,
    pub load: Arc<Load>,
    pub hooks: Arc<Mutex<Vec<Hook>>>,
    /// When each webhook-id arrived.
    pub arrived: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub secrets: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }

    pub fn arrivals(&self) -> Vec<(String, std::time::Instant)> {
        self.arrived.lock().unwrap().clone()
    }

    pub fn trust(&self, secret: &str) {
        self.secrets.lock().unwrap().push(secret.to_string());
    }

    pub fn answer(&self, script: &[u16], then: u16) {
        let mut b = self.behaviour.lock().unwrap();
        b.script = script.iter().copied().collect();
        b.then = then;
    }
}

fn verify(secret: &str, id: &str, ts: &str, body: &[u8], signature: &str) -> bool {
    let Some(encoded) = signature.strip_prefix("v1,") else {
        return false;
    };
    let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let Ok(key) =
        base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_"))
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut message = format!("{id}.{ts}.").into_bytes();
    message.extend_from_slice(body);
    ring::hmac::verify(&key, &message, &expected).is_ok()
}

struct Shared {
    load: Arc<Load>,
    hooks: Arc<Mutex<Vec<Hook>>>,
    arrived: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    secrets: Arc<Mutex<Vec<String>>>,
}

async fn hook(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let now = shared.load.in_hand.fetch_add(1, Ordering::SeqCst) + 1;
    shared.load.most_in_hand.fetch_max(now, Ordering::SeqCst);
    let answer = answer(&req, body, &shared).await;
    shared.load.in_hand.fetch_sub(1, Ordering::SeqCst);
    answer
}

async fn answer(req: &HttpRequest, body: web::Bytes, shared: &Shared) -> HttpResponse {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, ts, sigs) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    shared
        .arrived
        .lock()
        .unwrap()
        .push((id.clone(), std::time::Instant::now()));
    let secrets = shared.secrets.lock().unwrap().clone();
    let verified_with = secrets
        .iter()
        .filter(|s| sigs.split(' ').any(|sig| verify(s, &id, &ts, &body, sig)))
        .cloned()
        .collect();
    let (status, retry_after, delay) = {
        let mut b = shared.behaviour.lock().unwrap();
        let status = b.script.pop_front().unwrap_or(b.then);
        (status, b.retry_after, b.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    shared.hooks.lock().unwrap().push(Hook {
        id,
        timestamp: ts.parse().unwrap_or(0),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        verified_with,
        signatures: sigs.split(' ').filter(|s| !s.is_empty()).count(),
        status,
    });
    let mut res = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if let Some(s) = retry_after {
        res.insert_header(("retry-after", s.to_string()));
    }
    res.finish()
}

pub fn start_receiver() -> Receiver {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let behaviour = Arc::new(Mutex::new(Behaviour {
        then: 204,
        ..Default::default()
    }));
    let secrets = Arc::new(Mutex::new(Vec::new()));
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let load = Arc::new(Load::default());
    let shared = web::Data::new(Shared {
        load: load.clone(),
        hooks: hooks.clone(),
        arrived: arrived.clone(),
        behaviour: behaviour.clone(),
        secrets: secrets.clone(),
    });
    let connections = load.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .route("/hook", web::post().to(hook))
    })
    .on_connect(move |_, _| {
        connections.connections.fetch_add(1, Ordering::SeqCst);
    })
    .workers(2)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    Receiver {
        url: format!("http://127.0.0.1:{port}/hook"),
        load,
        hooks,
        arrived,
        behaviour,
        secrets,
    }
}
