//! A Twilio-compatible endpoint fast enough for load: keeps the latest code per phone number
//! and counts every message delivered, per number (what an SMS provider would bill).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

#[derive(Clone, Default)]
pub struct CodeCapture {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    /// The latest code per number, until taken.
    codes: HashMap<String, String>,
    /// Messages delivered per number.
    delivered: HashMap<String, u64>,
}

impl CodeCapture {
    /// Serves on a free loopback port; returns the base URL for `TWILIO_API_BASE`.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("capture port binds");
        let addr = listener.local_addr().expect("bound address");
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let this = this.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let this = this.clone();
                        async move { this.answer(request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn answer(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let mut to = String::new();
        let mut code = String::new();
        for (key, value) in form_urlencoded::parse(&body) {
            match key.as_ref() {
                "To" => to = value.into_owned(),
                "Body" => code = value.chars().filter(char::is_ascii_digit).collect(),
                _ => {}
            }
        }
        let mut captured = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *captured.delivered.entry(to.clone()).or_default() += 1;
        captured.codes.insert(to, code);
        drop(captured);
        Ok(Response::builder()
            .status(201)
            .body(Full::new(Bytes::from_static(br#"{"status":"queued"}"#)))
            .unwrap_or_default())
    }

    /// Takes the latest code sent to `phone` (E.164).
    pub fn take(&self, phone: &str) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .codes
            .remove(phone)
    }

    /// Messages delivered so far to numbers starting with `prefix` (E.164).
    pub fn delivered_to(&self, prefix: &str) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delivered
            .iter()
            .filter(|(to, _)| to.starts_with(prefix))
            .map(|(_, count)| count)
            .sum()
    }
}
