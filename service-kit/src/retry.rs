//! How a refsys client retries, as `deploy/grpc-service-config.json` publishes it for every
//! caller: UNAVAILABLE after a jittered exponential backoff ([`RetryPolicy`]), and at once a
//! call the server never processed ([`never_processed`], gRPC's transparent retry, which
//! tonic leaves to its callers).

use std::time::Duration;

/// A gRPC `retryPolicy` (retryable code: UNAVAILABLE only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
}

impl RetryPolicy {
    /// The policy of `deploy/grpc-service-config.json` (a unit test holds the two together).
    pub const PUBLISHED: Self = Self {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        backoff_multiplier: 2.0,
    };

    /// The upper bound of the pause before retry number `retry` (1 for the first retry):
    /// `min(initial_backoff × multiplier^(retry-1), max_backoff)`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.backoff_multiplier.powi(exponent);
        if factor.is_finite()
            && self.initial_backoff.as_secs_f64() * factor < self.max_backoff.as_secs_f64()
        {
            self.initial_backoff.mul_f64(factor)
        } else {
            self.max_backoff
        }
    }

    /// The pause before retry number `retry`: uniformly random up to the ceiling, as gRPC
    /// does, so that callers failed by the same event do not come back in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        use rand::Rng;
        self.backoff_ceiling(retry)
            .mul_f64(rand::rng().random::<f64>())
    }
}

/// Whether `status` is a call the server never processed, so that retrying it is safe whatever
/// the RPC:
/// - it never left this process: it was queued on a connection that closed before writing it
///   (a replica going away closes its connections). tonic answers CANCELLED with hyper's
///   "canceled" error as the source;
/// - the server refused it unread with a graceful GOAWAY (HTTP/2 NO_ERROR): the stream was
///   sent after the draining server chose the last stream it would process. tonic answers
///   INTERNAL ("h2 protocol error") for it, which a caller retrying only UNAVAILABLE would
///   otherwise pass on as a server fault; grpc-java and grpc-go retry it transparently.
///
/// A GOAWAY with an error code is not counted: h2 then fails every open stream with it,
/// processed or not.
pub fn never_processed(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return status.code() == tonic::Code::Cancelled;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_without_a_transport_cause_is_not_retried_at_once() {
        // A CANCELLED or INTERNAL from the server (or any status without the transport's own
        // error as its source) may have been processed.
        assert!(!never_processed(&tonic::Status::cancelled(
            "operation was canceled"
        )));
        assert!(!never_processed(&tonic::Status::internal(
            "h2 protocol error: http2 error"
        )));
        assert!(!never_processed(&tonic::Status::unavailable(
            "connection refused"
        )));
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_full_jitter() {
        let policy = RetryPolicy::PUBLISHED;
        let ceilings: Vec<Duration> = (1..=6).map(|r| policy.backoff_ceiling(r)).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_secs(1));
        for retry in 1..=3 {
            for _ in 0..100 {
                assert!(policy.backoff(retry) <= policy.backoff_ceiling(retry));
            }
        }
        // All retries of one call fit well within the shortest deadline worth retrying in.
        let total: Duration = (1..policy.max_attempts)
            .map(|r| policy.backoff_ceiling(r))
            .sum();
        assert_eq!(total, Duration::from_millis(700));
    }

    /// A server that answers the first request on each connection with GOAWAY(last stream 0,
    /// `reason`): the request is refused unread, exactly what a draining server does to a
    /// stream that arrives after its final GOAWAY. Returns the URL to call.
    async fn goaway_server(reason: u32) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const PREFACE: usize = 24;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // Server preface: an empty SETTINGS frame.
            socket
                .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            let mut received = Vec::new();
            let mut buffer = [0u8; 4096];
            let mut parsed = PREFACE;
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                if n == 0 {
                    return;
                }
                received.extend_from_slice(&buffer[..n]);
                while received.len() >= parsed + 9 {
                    let header = &received[parsed..parsed + 9];
                    let length = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    if received.len() < parsed + 9 + length {
                        break;
                    }
                    parsed += 9 + length;
                    if kind == 4 && flags & 1 == 0 {
                        // Acknowledge the client's SETTINGS.
                        socket
                            .write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                            .await
                            .unwrap();
                    }
                    if kind == 1 {
                        let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        goaway.extend_from_slice(&reason.to_be_bytes());
                        socket.write_all(&goaway).await.unwrap();
                        socket.shutdown().await.unwrap();
                    }
                }
            }
        });
        format!("http://{address}")
    }

    async fn call_refused_with(reason: u32) -> tonic::Status {
        let channel = tonic::transport::Endpoint::from_shared(goaway_server(reason).await)
            .unwrap()
            .connect()
            .await
            .expect("the server accepts the connection");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err("the call is refused")
    }

    #[tokio::test]
    async fn a_call_refused_by_a_graceful_goaway_was_never_processed() {
        let status = call_refused_with(0).await;
        // tonic calls it INTERNAL, which nobody retries: the reason this function exists.
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(never_processed(&status), "{status:?}");
    }

    #[tokio::test]
    async fn a_goaway_with_an_error_code_may_follow_processing() {
        const PROTOCOL_ERROR: u32 = 1;
        let status = call_refused_with(PROTOCOL_ERROR).await;
        assert!(!never_processed(&status), "{status:?}");
    }
}
