//! A lean unary gRPC caller: the `h2` crate straight on the socket, bodies encoded once and
//! reused. What one call costs the load generator should be small next to what it costs the
//! server (h2load is the yardstick, see [`crate::compare`]). tonic's `Channel` puts a tower
//! buffer task between the caller and the connection, and hyper's client a dispatch task and,
//! per request, a spawned task that pipes the body; here the caller's own task opens the
//! stream, sends the body and reads the answer, and only the connection task does I/O.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, TE};
use hyper::{Method, Request, Uri};
use tonic::{Code, Status};

/// One method of one server: the URI every call posts to.
#[derive(Clone)]
pub struct Rpc {
    uri: Uri,
}

impl Rpc {
    /// `path` is `/package.Service/Method`.
    pub fn new(addr: SocketAddr, path: &str) -> Self {
        Self {
            uri: format!("http://{addr}{path}")
                .parse()
                .expect("valid gRPC URI"),
        }
    }
}

/// Flow-control window per stream and per connection: h2load's default for both.
const WINDOW: u32 = (1 << 30) - 1;

/// HTTP/2 connections to one server; callers pick one by index.
pub struct Connections {
    senders: Vec<SendRequest<Bytes>>,
}

fn unavailable(err: h2::Error) -> Status {
    Status::unavailable(err.to_string())
}

impl Connections {
    pub async fn open(addr: SocketAddr, count: usize) -> Self {
        let mut senders = Vec::with_capacity(count);
        for _ in 0..count {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|err| panic!("{addr} unreachable: {err}"));
            // Small requests and answers: waiting to coalesce them only adds latency.
            stream.set_nodelay(true).expect("TCP_NODELAY");
            // Windows as wide as h2load's, so answers never wait for a WINDOW_UPDATE and
            // few are sent.
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
                .handshake(stream)
                .await
                .unwrap_or_else(|err| panic!("HTTP/2 handshake with {addr}: {err}"));
            tokio::spawn(async move {
                let _ = connection.await;
            });
            senders.push(sender);
        }
        Self { senders }
    }

    /// One unary call on connection `index % count`: `body` is a length-prefixed message
    /// ([`frame`]), `bearer` the whole `authorization` value. Returns the answer's message
    /// bytes (without the prefix) or the call's status.
    pub async fn unary(
        &self,
        index: usize,
        rpc: &Rpc,
        bearer: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Bytes, Status> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = rpc.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        if let Some(bearer) = bearer {
            headers.insert(AUTHORIZATION, bearer.clone());
        }
        // Waits while the connection is at the server's stream limit.
        let mut sender = self.senders[index % self.senders.len()]
            .clone()
            .ready()
            .await
            .map_err(unavailable)?;
        let (response, mut send) = sender.send_request(request, false).map_err(unavailable)?;
        send.send_data(body, true).map_err(unavailable)?;
        let (parts, mut answer) = response.await.map_err(unavailable)?.into_parts();
        if !parts.status.is_success() {
            return Err(Status::unknown(format!("HTTP {}", parts.status)));
        }
        // A trailers-only answer (every error) carries grpc-status in the headers.
        if let Some(status) = failed(&parts.headers) {
            return Err(status);
        }
        // A unary answer is one message, nearly always in one DATA frame.
        let mut message = Bytes::new();
        while let Some(chunk) = answer.data().await {
            let chunk = chunk.map_err(unavailable)?;
            let _ = answer.flow_control().release_capacity(chunk.len());
            message = if message.is_empty() {
                chunk
            } else {
                [message, chunk].concat().into()
            };
        }
        match answer.trailers().await.map_err(unavailable)? {
            Some(trailers) => {
                if let Some(status) = failed(&trailers) {
                    return Err(status);
                }
            }
            None => return Err(Status::internal("answer without trailers")),
        }
        if message.len() < 5 {
            return Err(Status::internal("answer without a message"));
        }
        Ok(message.slice(5..))
    }
}

/// The status `headers` carry when it is not OK; `None` for OK or no status at all.
fn failed(headers: &HeaderMap) -> Option<Status> {
    let code = headers.get("grpc-status")?;
    if code.as_bytes() == b"0" {
        return None;
    }
    Some(Status::from_header_map(headers).unwrap_or_else(|| {
        let code = std::str::from_utf8(code.as_bytes())
            .ok()
            .and_then(|c| c.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from);
        Status::new(code, "")
    }))
}

/// `message` encoded with the gRPC length prefix (uncompressed), ready to send any number of
/// times.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("message under 4 GiB"));
    message.encode(&mut buf).expect("buffer has room");
    buf.freeze()
}

/// `Bearer <token>` as a header value, built once per token.
pub fn bearer(token: &str) -> HeaderValue {
    HeaderValue::try_from(format!("Bearer {token}")).expect("token is ASCII")
}

/// Decodes an answer's message bytes.
pub fn decode<M: prost::Message + Default>(message: Bytes) -> Result<M, Status> {
    M::decode(message).map_err(|err| Status::internal(format!("undecodable answer: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use refsys_proto::auth::v1::RefreshTokensRequest;

    #[test]
    fn a_frame_is_the_uncompressed_flag_the_length_and_the_message() {
        let empty = frame(&refsys_proto::referral::v1::GetProfileRequest {});
        assert_eq!(&empty[..], &[0, 0, 0, 0, 0]);
        let request = RefreshTokensRequest {
            refresh_token: "t".repeat(43),
        };
        let framed = frame(&request);
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]),
            45
        );
        let decoded: RefreshTokensRequest = decode(framed.slice(5..)).expect("decodes");
        assert_eq!(decoded, request);
    }

    #[test]
    fn only_a_nonzero_grpc_status_is_a_failure() {
        let mut headers = HeaderMap::new();
        assert!(failed(&headers).is_none());
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(failed(&headers).is_none());
        headers.insert("grpc-status", HeaderValue::from_static("16"));
        headers.insert("grpc-message", HeaderValue::from_static("no%20token"));
        let status = failed(&headers).expect("UNAUTHENTICATED");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "no token");
    }
}
