//! The stores on a real Redis Cluster (3 primaries, started with `scripts/redis-cluster` for
//! this test alone): every Lua script runs there — where Redis itself refuses keys of one
//! script in different slots, and scripts touching keys they did not declare — and a cross-slot
//! script is a bug (INTERNAL), never an outage (UNAVAILABLE).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_service::client::ClientId;
use auth_service::error::{AuthError, Limit, Rejection};
use auth_service::otp::{CodeLength, OtpCode, Pepper};
use auth_service::service_clients::ServiceClients;
use auth_service::store::fraud::{FraudMode, FraudSettings};
use auth_service::store::otp::{OtpLimits, OtpStore, SendAdmission, VerifyOutcome};
use auth_service::store::refresh::{
    FamilyOwner, RefreshStore, RefreshToken, RotateOutcome, SessionLimits, SuccessorKey,
};
use auth_service::store::service_tokens::{Admission, ServiceTokenLimits, ServiceTokenStore};
use auth_service::store::{self, RedisConnection, StoreError, slots};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

use crate::{phone, prefix};

const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A cluster of this test's own; stopped (servers killed, directory removed) on drop.
struct Cluster {
    dir: tempfile::TempDir,
    seeds: Vec<String>,
    ports: Vec<u16>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster")
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new(script())
            .args(["start", "--primaries", "3", "--replicas", "0", "--dir"])
            .arg(dir.path().join("cluster"))
            .output()
            .expect("scripts/redis-cluster runs");
        assert!(
            output.status.success(),
            "scripts/redis-cluster start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let urls = stdout
            .lines()
            .find_map(|line| line.strip_prefix("REDIS_CLUSTER_URLS="))
            .expect("the seed URLs are printed");
        let seeds: Vec<String> = urls.split(',').map(str::to_owned).collect();
        let ports = seeds
            .iter()
            .map(|url| url.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        Self { dir, seeds, ports }
    }

    async fn node(&self, port: u16) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path().join("cluster"))
            .output();
    }
}

fn t0() -> SystemTime {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

#[tokio::test]
async fn every_script_runs_on_a_redis_cluster_and_a_cross_slot_one_is_a_bug() {
    let cluster = Cluster::start();
    let conn = store::connect_cluster(&cluster.seeds, Duration::from_secs(1))
        .await
        .expect("the cluster answers");
    assert!(conn.is_cluster());
    assert!(store::is_reachable(&conn, Duration::from_secs(1)).await);
    let prefix = prefix();

    // Codes: sends (every budget, the fraud gate in enforce mode), refusals, rollbacks, wrong
    // and right codes, consume and release, for phones spread over the slots.
    let otp = OtpStore::new(
        conn.clone(),
        prefix.clone(),
        OtpLimits::default(),
        FraudSettings {
            mode: FraudMode::Enforce,
            ..FraudSettings::default()
        },
        CALL_TIMEOUT,
    );
    let pepper = Pepper::from_bytes(vec![3; 32]).unwrap();
    let me = ClientId::from_ip("192.0.2.7".parse().unwrap());
    let code = OtpCode::parse("1234", CodeLength::default()).unwrap();
    let wrong = OtpCode::parse("9999", CodeLength::default()).unwrap();
    for n in 0..12 {
        let to = phone(&format!("+796012330{n:02}"));
        let hash = pepper.hash_code(&to, &code);
        let SendAdmission::Admitted(reservation) = otp.begin_send(&to, &me, &hash).await.unwrap()
        else {
            panic!("first send to {to:?} refused");
        };
        assert!(matches!(
            otp.begin_send(&to, &me, &hash).await.unwrap(),
            SendAdmission::Refused {
                limit: Limit::ResendCooldown,
                ..
            }
        ));
        if n % 4 == 3 {
            // The SMS "failed": the send is undone and may be retried at once.
            otp.rollback_send(reservation).await.unwrap();
            assert!(matches!(
                otp.begin_send(&to, &me, &hash).await.unwrap(),
                SendAdmission::Admitted(_)
            ));
        } else {
            drop(reservation);
        }
        otp.record_sent(&to, t0()).await.unwrap();
        let wrong_hash = pepper.hash_code(&to, &wrong);
        assert!(matches!(
            otp.verify(&to, &me, &wrong_hash, None).await.unwrap(),
            VerifyOutcome::Rejected(Rejection::Wrong)
        ));
        let VerifyOutcome::Claimed(claim) = otp.verify(&to, &me, &hash, None).await.unwrap() else {
            panic!("the right code is claimed");
        };
        if n % 2 == 0 {
            assert!(otp.release(claim).await.unwrap());
            let VerifyOutcome::Claimed(claim) = otp.verify(&to, &me, &hash, None).await.unwrap()
            else {
                panic!("a released code is claimed again");
            };
            assert!(otp.consume(claim).await.unwrap());
        } else {
            assert!(otp.consume(claim).await.unwrap());
        }
        otp.record_verified(&to, t0()).await.unwrap();
        assert!(matches!(
            otp.verify(&to, &me, &hash, None).await.unwrap(),
            VerifyOutcome::Rejected(Rejection::NoCode)
        ));
    }

    // Sessions: create, rotate, replay within the grace window, reuse (theft), list, revoke.
    let sessions = RefreshStore::new(
        conn.clone(),
        prefix.clone(),
        SessionLimits::default(),
        SuccessorKey::new([5; 32]),
        CALL_TIMEOUT,
    );
    let owner = FamilyOwner {
        user_id: "0190f5e2-0000-7000-8000-0000000000c1".to_owned(),
        roles: vec![],
    };
    let now = t0();
    let first = sessions
        .create_family(&owner, "192.0.2.x", now)
        .await
        .unwrap();
    let second = sessions
        .create_family(&owner, "192.0.2.x", now)
        .await
        .unwrap();
    let RotateOutcome::Rotated(next) = rotate(&sessions, &first.token, now).await else {
        panic!("rotation");
    };
    let later = now + Duration::from_secs(1);
    let RotateOutcome::Rotated(replay) = rotate(&sessions, &first.token, later).await else {
        panic!("a retry within the grace window replays");
    };
    assert!(replay.replayed && replay.token.expose() == next.token.expose());
    let much_later = now + Duration::from_secs(60);
    assert!(matches!(
        rotate(&sessions, &first.token, much_later).await,
        RotateOutcome::Reused
    ));
    assert_eq!(sessions.sessions(&owner.user_id).await.unwrap().len(), 1);
    assert!(sessions.revoke(&second.token).await.unwrap());
    assert_eq!(sessions.revoke_all(&owner.user_id).await.unwrap(), 0);

    // Service-token budgets, for a configured id and for unknown ones.
    let clients = ServiceClients::parse(
        &serde_json::json!({"clients": [{"id": "shop", "secret_sha256": "0".repeat(64),
            "scopes": ["referral.points.read"]}]})
        .to_string(),
    )
    .unwrap();
    let tokens = ServiceTokenStore::new(
        conn.clone(),
        prefix.clone(),
        ServiceTokenLimits::default(),
        CALL_TIMEOUT,
    );
    for client in [clients.get("shop"), None] {
        let Admission::Admitted(attempt) = tokens.admit(client).await.unwrap() else {
            panic!("admitted");
        };
        tokens.succeeded(attempt).await.unwrap();
    }

    // Every script ran: a fresh cluster holds a script only once it was invoked.
    let mut node = cluster.node(cluster.ports[0]).await;
    for (name, source) in store::SCRIPTS {
        let sha = redis::Script::new(source).get_hash().to_owned();
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query_async(&mut node)
            .await
            .unwrap();
        assert_eq!(exists, [true], "the {name} script never ran on the cluster");
    }

    // Our slots are the cluster's, and the keys landed on more than one primary.
    let keys_of = |pattern: String| {
        let cluster = &cluster;
        async move {
            let mut per_node = Vec::new();
            for &port in &cluster.ports {
                let mut node = cluster.node(port).await;
                let keys: Vec<String> = node.keys(&pattern).await.unwrap();
                per_node.push(keys);
            }
            per_node
        }
    };
    let per_node = keys_of(format!("{prefix}*")).await;
    for keys in &per_node {
        for key in keys.iter().take(5) {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut node)
                .await
                .unwrap();
            assert_eq!(slot, slots::key_slot(key.as_bytes()), "{key}");
        }
    }
    let holding = per_node.iter().filter(|keys| !keys.is_empty()).count();
    assert!(holding >= 2, "keys on {holding} primary: {per_node:?}");

    // A script whose keys span slots is refused before it is sent, as a bug...
    let mut ours = conn.clone();
    let err = redis::Script::new("return 1")
        .key(format!("{prefix}{{a}}:x"))
        .key(format!("{prefix}{{b}}:x"))
        .invoke_async::<i64>(&mut ours)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), redis::ErrorKind::CrossSlot, "{err}");
    expect_internal(StoreError::from(err));
    // ...and so is what the cluster answers when one gets there anyway (the cluster client
    // without our check), or when a script touches a key it did not declare.
    assert!(matches!(conn, RedisConnection::Cluster(_)));
    let mut raw = store::connection::cluster_client(&cluster.seeds, Duration::from_secs(1))
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let err = redis::Script::new("return 1")
        .key(format!("{prefix}{{a}}:x"))
        .key(format!("{prefix}{{b}}:x"))
        .invoke_async::<i64>(&mut raw)
        .await
        .unwrap_err();
    expect_internal(StoreError::from(err));
    let err = redis::Script::new("return redis.call('GET', ARGV[1])")
        .key(format!("{prefix}{{a}}:x"))
        .arg(format!("{prefix}{{b}}:x"))
        .invoke_async::<Option<String>>(&mut raw)
        .await
        .unwrap_err();
    expect_internal(StoreError::from(err));
}

async fn rotate(sessions: &RefreshStore, token: &RefreshToken, at: SystemTime) -> RotateOutcome {
    let found = sessions.peek(token).await.unwrap().expect("a known token");
    sessions
        .rotate(token, &found.session_id, &[], at)
        .await
        .unwrap()
}

fn expect_internal(err: StoreError) {
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let status = tonic::Status::from(AuthError::from(err));
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
}
