//! Redis going silent mid-flight: calls fail fast as unavailable and work again afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use auth_service::client::ClientId;
use auth_service::error::{AuthError, Rejection};
use auth_service::otp::{CodeLength, OtpCode, Pepper};
use auth_service::store::fraud::FraudSettings;
use auth_service::store::otp::{OtpLimits, OtpStore, VerifyOutcome};
use auth_service::store::{StoreError, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{phone, prefix, redis_url};

/// A TCP proxy to Redis that can be frozen: bytes are held until it thaws (a hung server).
async fn freezable_proxy() -> (String, Arc<AtomicBool>) {
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, flag.clone()));
            tokio::spawn(pump(sr, cw, flag.clone()));
        }
    });
    (format!("redis://{addr}"), frozen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Frozen: hold the bytes (TCP loses nothing; a hung server answers late or never).
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_silent_redis_fails_fast_and_recovers() {
    let (url, frozen) = freezable_proxy().await;
    let conn = connect(&url, Duration::from_millis(500)).await.unwrap();
    let store = OtpStore::new(
        conn,
        prefix(),
        OtpLimits::default(),
        FraudSettings::default(),
        Duration::from_secs(1),
    );
    let client = ClientId::from_ip("192.0.2.1".parse().unwrap());
    let to = phone("+79601233017");
    let pepper = Pepper::from_bytes(vec![1; 32]).unwrap();
    let code = OtpCode::parse("1234", CodeLength::default()).unwrap();
    let hash = pepper.hash_code(&to, &code);
    assert!(matches!(
        store.verify(&to, &client, &hash, None).await.unwrap(),
        VerifyOutcome::Rejected(Rejection::NoCode)
    ));

    frozen.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let started = Instant::now();
        let err = store.verify(&to, &client, &hash, None).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let status = tonic::Status::from(AuthError::from(err));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    frozen.store(false, Ordering::SeqCst);
    // The connection manager reconnects by itself; allow it a few tries.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.verify(&to, &client, &hash, None).await {
            Ok(VerifyOutcome::Rejected(Rejection::NoCode)) => break,
            Ok(other) => panic!("{other:?}"),
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("did not recover: {err:?}"),
        }
    }
}
