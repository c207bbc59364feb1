//! Start-up configuration errors are printed, so they must never show the Redis password.

use auth_service::config::AuthConfig;

#[test]
fn a_bad_redis_url_names_the_key_without_its_password() {
    for url in [
        "redis://user:s3cret@host:notaport",
        "redis://:s3cret@host:99999",
        "rediss://user:s3/cret@host:x",
        "http://user:s3cret@host",
    ] {
        let err = AuthConfig::from_source([("REDIS_URL", url)]).unwrap_err();
        let line = err.to_string();
        assert!(line.contains("REDIS_URL="), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains("s3cret"), "{line}");
        assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
    }
    let line = AuthConfig::from_source([("REDIS_URL", "redis://user:s3cret@host:notaport")])
        .unwrap_err()
        .to_string();
    assert!(line.contains("redis://user:***@host:notaport"), "{line}");
}
